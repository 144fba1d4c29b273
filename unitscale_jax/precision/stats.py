"""How well a tensor fits a format: fractions that underflow, saturate or go subnormal.

Used by the low-precision experiment to compare parametrizations per tensor class
(activations, weights, gradients). All fractions are of the tensor's total element count, for
round-to-nearest casts (``simulate(x, fmt)``):

- ``underflow``: nonzero finite values that flush to zero, ``0 < |x| <= min_subnormal / 2``
  (the tie at half the smallest subnormal rounds to even, i.e. to zero).
- ``saturation``: finite values beyond the largest finite value, ``|x| > max`` (clipped to
  ``+-max``; a plain cast would give NaN for E4M3 or inf for E5M2 instead).
- ``subnormal``: values that survive but lose precision, ``min_subnormal / 2 < |x| < min_normal``.
- ``zero``: exact zeros; ``nonfinite``: NaN or inf.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp

from unitscale_jax.precision.formats import FloatFormat, get_format
from unitscale_jax.precision.simulate import check_float_input


class FormatStats(NamedTuple):
    """Fractions of a tensor's elements (float32 scalars; see the module docstring)."""

    underflow: jax.Array
    saturation: jax.Array
    subnormal: jax.Array
    zero: jax.Array
    nonfinite: jax.Array


def format_stats(x: jax.Array, fmt: Union[FloatFormat, str]) -> FormatStats:
    """Underflow, saturation, subnormal, zero and non-finite fractions of ``x`` for ``fmt``.

    Works under ``jit`` and ``vmap`` (fractions over the whole array given). An empty array
    gives zeros.
    """
    fmt = get_format(fmt)
    x = check_float_input(x, "format_stats")
    a = jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32))
    finite = jnp.isfinite(a)
    zero = a == 0
    half_sub = fmt.min_subnormal / 2
    masks = FormatStats(
        underflow=finite & ~zero & (a <= half_sub),
        saturation=finite & (a > fmt.max),
        subnormal=(a > half_sub) & (a < fmt.min_normal),
        zero=zero,
        nonfinite=~finite,
    )
    n = max(x.size, 1)
    return FormatStats(*(jnp.sum(m, dtype=jnp.float32) / n for m in masks))


def tree_format_stats(tree: Any, fmt: Union[FloatFormat, str]) -> Any:
    """``format_stats`` for every floating-point leaf of a pytree (other leaves -> None)."""

    def one(leaf):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return format_stats(leaf, fmt)
        return None

    return jax.tree.map(one, tree)


def underflow_fraction(x: jax.Array, fmt: Union[FloatFormat, str]) -> jax.Array:
    """Fraction of ``x``'s elements that are nonzero and flush to zero in ``fmt``."""
    return format_stats(x, fmt).underflow


def saturation_fraction(x: jax.Array, fmt: Union[FloatFormat, str]) -> jax.Array:
    """Fraction of ``x``'s elements that exceed ``fmt.max`` in magnitude (finite values)."""
    return format_stats(x, fmt).saturation
