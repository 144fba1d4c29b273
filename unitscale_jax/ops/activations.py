"""Unit-scaled nonlinearities: GELU, SiLU, SwiGLU's gate, softmax and dropout.

The scales of u-muP's multiplier-carrying ops (Blake et al., 2025, appendix: "unit-scaled op
definitions") interpolate logarithmically between the op's two limiting regimes, with the
multiplier deciding where between them it sits; they match ``unit_scaling.functional`` 0.3.5.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from unitscale_jax.ops._checks import require_float, require_range_rate
from unitscale_jax.ops._scale import scale_bwd, scale_fwd
from unitscale_jax.ops.constraints import Constraint, apply_constraint, logarithmic_interpolation


def _check_mult(mult: float, op: str) -> float:
    mult = float(mult)
    if not mult > 0 or not math.isfinite(mult):
        raise ValueError(f"{op}: mult must be a finite float > 0, got {mult}.")
    return mult


def gelu_scales(mult: float) -> tuple[float, float]:
    """``(alpha, beta)`` of ``gelu``: linear limit (scale 2) to ReLU limit."""
    a = 1.0 / (1.0 + 0.25 / mult**2)
    return (
        logarithmic_interpolation(a, 2.0, (2.0 / (1.0 - 1.0 / math.pi)) ** 0.5),
        logarithmic_interpolation(a, 2.0, 2.0**0.5),
    )


def gelu(
    x: jax.Array,
    *,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
    approximate: bool = False,
) -> jax.Array:
    """Unit-scaled GELU: ``alpha * gelu(mult * x) / mult``.

    Scaling rule: with ``a = 1 / (1 + 0.25 / mult^2)``,
    ``alpha = interp(a, 2, sqrt(2 / (1 - 1/pi)))`` and ``beta = interp(a, 2, sqrt(2))``:
    for small ``mult`` GELU is ``x/2`` (scale 2 both ways); for large ``mult`` it is ReLU
    (output std ``sqrt((1 - 1/pi)/2)``, gradient std ``sqrt(1/2)``).

    Args:
      x: input.
      mult: the u-muP activation multiplier ``alpha_ffn-act``.
      constraint: a constraint name or None.
      approximate: use the tanh approximation.

    Returns:
      An array of ``x``'s shape and dtype.
    """
    require_float(x, "x", "gelu")
    mult = _check_mult(mult, "gelu")
    output_scale, grad_scale = apply_constraint(constraint, *gelu_scales(mult))
    x = scale_bwd(x, grad_scale)
    y = jax.nn.gelu(x, approximate=approximate) if mult == 1.0 else (
        jax.nn.gelu(x * mult, approximate=approximate) / mult
    )
    return scale_fwd(y, output_scale)


def silu(x: jax.Array, *, mult: float = 1.0, constraint: Constraint = "to_output_scale") -> jax.Array:
    """Unit-scaled SiLU: ``alpha * x * sigmoid(mult * x)``.

    Scaling rule: ``alpha`` as GELU's; ``beta = interp(1 / (1 + 1/mult^2), 2, sqrt(2))``.

    Args:
      x: input.
      mult: the u-muP activation multiplier.
      constraint: a constraint name or None.

    Returns:
      An array of ``x``'s shape and dtype.
    """
    require_float(x, "x", "silu")
    mult = _check_mult(mult, "silu")
    a = 1.0 / (1.0 + 0.25 / mult**2)
    output_scale = logarithmic_interpolation(a, 2.0, (2.0 / (1.0 - 1.0 / math.pi)) ** 0.5)
    grad_scale = logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, 2.0**0.5)
    output_scale, grad_scale = apply_constraint(constraint, output_scale, grad_scale)
    x = scale_bwd(x, grad_scale)
    return scale_fwd(x * jax.nn.sigmoid(x * mult), output_scale)


def silu_glu(x: jax.Array, gate: jax.Array, *, mult: float = 1.0) -> jax.Array:
    """Unit-scaled gated linear unit ``s * x * silu(gate)`` (SwiGLU's nonlinearity).

    Scaling rule: one scale ``s = interp(1 / (1 + 1/mult^2), 2, sqrt(2))`` multiplies the
    output and both input gradients (the op is always constrained).

    Args:
      x: linear input.
      gate: gate input, same shape as ``x``.
      mult: the u-muP activation multiplier.

    Returns:
      An array of ``x``'s shape.
    """
    require_float(x, "x", "silu_glu")
    require_float(gate, "gate", "silu_glu")
    if x.shape != gate.shape:
        raise ValueError(f"silu_glu: x and gate must have the same shape, got {x.shape} and {gate.shape}.")
    mult = _check_mult(mult, "silu_glu")
    s = logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, 2.0**0.5)
    x = scale_bwd(x, s)
    gate = scale_bwd(gate, s)
    return scale_fwd(x * gate * jax.nn.sigmoid(gate * mult), s)


def softmax(
    x: jax.Array,
    axis: int = -1,
    *,
    mult: float = 1.0,
    constraint: Constraint = "to_output_scale",
) -> jax.Array:
    """Unit-scaled softmax: ``alpha * softmax(mult * x)`` along ``axis``.

    Scaling rule, ``n = x.shape[axis]`` and ``a = 1 / (1 + 4/mult^2)``:
    ``alpha = interp(a, n, sqrt(n))`` (flat limit: outputs 1/n; one-hot limit: std
    ``n^-1/2``) and ``beta = interp(a, n/mult, sqrt(n/mult))``.

    Args:
      x: input.
      axis: the normalised axis.
      mult: the softmax multiplier (u-muP's ``alpha_attn-softmax`` when used in attention).
      constraint: a constraint name or None.

    Returns:
      An array of ``x``'s shape and dtype (computed in float32).
    """
    require_float(x, "x", "softmax")
    mult = _check_mult(mult, "softmax")
    n = x.shape[axis]
    a = 1.0 / (1.0 + 4.0 / mult**2)
    output_scale = logarithmic_interpolation(a, n, n**0.5)
    grad_scale = logarithmic_interpolation(a, n / mult, (n / mult) ** 0.5)
    output_scale, grad_scale = apply_constraint(constraint, output_scale, grad_scale)
    x = scale_bwd(x, grad_scale)
    # Normalise in float32 (as PyTorch does on CPU): a bf16 softmax backward loses ~1e-2.
    y = jax.nn.softmax(x.astype(jnp.float32) * mult, axis=axis).astype(x.dtype)
    return scale_fwd(y, output_scale)


def _dropout(x, rate, rng):
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def dropout(
    x: jax.Array,
    rate: float,
    *,
    rng: Optional[jax.Array] = None,
    deterministic: bool = False,
) -> jax.Array:
    """Unit-scaled inverted dropout.

    Scaling rule: ``alpha = beta = sqrt(1 - rate)``, unconstrained (Blake et al., 2023,
    table A.2): inverted dropout's output has variance ``1/(1-rate)``. As in the reference,
    ``alpha`` is applied in deterministic (evaluation) mode too, so train and eval outputs
    agree in expectation.

    Args:
      x: input.
      rate: drop probability in ``[0, 1)``.
      rng: a PRNG key, required unless ``deterministic`` or ``rate == 0``.
      deterministic: if True, no elements are dropped.

    Returns:
      An array of ``x``'s shape and dtype.
    """
    require_float(x, "x", "dropout")
    rate = require_range_rate(rate, "dropout")
    scale = (1.0 - rate) ** 0.5
    x = scale_bwd(x, scale)
    if not deterministic and rate > 0.0:
        if rng is None:
            raise ValueError("dropout: rng is required when rate > 0 and deterministic=False.")
        x = _dropout(x, rate, rng)
    return scale_fwd(x, scale)
