"""Per-tensor scale statistics: std, RMS, mean |x|, max |x| and low-precision fit.

Every statistic is a float32 scalar computed in float32 from the whole tensor, so the
function is traceable (``jit``, ``vmap``) and its result is a small pytree. The fit to a
format reuses ``unitscale_jax.precision.format_stats`` (round-to-nearest casts):

- ``<fmt>_underflow``: fraction of elements that are nonzero and flush to zero,
- ``<fmt>_saturation``: fraction of finite elements with ``|x| > fmt.max``,

for ``fmt`` in ``FORMATS`` (FP16, OCP E4M3 ``e4m3fn`` with max 448, OCP E5M2 ``e5m2``).
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

from unitscale_jax.precision.formats import E4M3, E5M2, FP16, FloatFormat, get_format
from unitscale_jax.precision.stats import format_stats

FORMATS: tuple[FloatFormat, ...] = (FP16, E4M3, E5M2)
SCALE_STATS = ("std", "rms", "mean_abs", "max_abs")


def stat_names(formats: Sequence[Union[FloatFormat, str]] = FORMATS) -> tuple[str, ...]:
    """The keys of ``tensor_stats(x, formats)``, in order."""
    fits = tuple(f"{get_format(f).name}_{k}" for f in formats for k in ("underflow", "saturation"))
    return SCALE_STATS + fits


def tensor_stats(x: jax.Array, formats: Sequence[Union[FloatFormat, str]] = FORMATS
                 ) -> dict[str, jax.Array]:
    """Scale statistics of ``x`` (all elements).

    ``std = sqrt(mean((x - mean x)^2))`` (population std), ``rms = sqrt(mean(x^2))``,
    ``mean_abs = mean(|x|)``, ``max_abs = max(|x|)``, and each format's underflow and
    saturation fractions (see the module docstring). A unit-scaled tensor has ``rms`` near 1
    (Blake et al., 2023, section 3).

    Args:
      x: a floating-point array (cast to float32 for the statistics).
      formats: formats whose fit is measured.

    Returns:
      A dict ``{name: float32 scalar}`` with keys ``stat_names(formats)``.
    """
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError("tensor_stats needs a floating-point array, "
                        f"got {getattr(x, 'dtype', type(x))}.")
    if x.size == 0:
        raise ValueError(
            "tensor_stats: the array is empty (shape {}); nothing to measure.".format(x.shape))
    x32 = jax.lax.stop_gradient(x).astype(jnp.float32)
    a = jnp.abs(x32)
    out = {
        "std": jnp.std(x32),
        "rms": jnp.sqrt(jnp.mean(jnp.square(x32))),
        "mean_abs": jnp.mean(a),
        "max_abs": jnp.max(a),
    }
    for f in formats:
        f = get_format(f)
        s = format_stats(x32, f)
        out[f"{f.name}_underflow"] = s.underflow
        out[f"{f.name}_saturation"] = s.saturation
    return out
