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

from unitscale_jax.ops import plain
from unitscale_jax.ops._checks import require_float, require_range_rate
from unitscale_jax.ops._scale import scale_bwd, scale_fwd
from unitscale_jax.ops.constraints import Constraint, apply_constraint, logarithmic_interpolation


def _check_mult(mult: float, op: str) -> float:
    mult = float(mult)
    if not mult > 0 or not math.isfinite(mult):
        raise ValueError(f"{op}: mult must be a finite float > 0, got {mult}.")
    return mult


def _scaled(f, x, output_scale: float, grad_scale: float):
    """``scale_fwd(f(scale_bwd(x, grad_scale)), output_scale)``. With equal (constrained)
    scales ``s`` that is exactly ``s * f(x)`` with its ordinary gradient, and is computed so:
    no custom scale ops around the nonlinearity (the gradient's products are rounded in
    another order, float32 rounding only)."""
    if output_scale == grad_scale:
        y = f(x)
        return y if output_scale == 1.0 else y * jnp.asarray(output_scale, y.dtype)
    return scale_fwd(f(scale_bwd(x, grad_scale)), output_scale)


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
    return _scaled(lambda t: plain.gelu(t, mult=mult, approximate=approximate), x,
                   output_scale, grad_scale)


def silu(x: jax.Array, *, mult: float = 1.0,
         constraint: Constraint = "to_output_scale") -> jax.Array:
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
    return _scaled(lambda t: plain.silu(t, mult=mult), x, output_scale, grad_scale)


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
        raise ValueError("silu_glu: x and gate must have the same shape, "
                         f"got {x.shape} and {gate.shape}.")
    mult = _check_mult(mult, "silu_glu")
    s = logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, 2.0**0.5)
    # one scale on the output and both input gradients: s * x * silu(gate), ordinary gradient
    return (x * jnp.asarray(s, x.dtype)) * plain.silu(gate, mult=mult)


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
    # Normalise in float32 (as PyTorch does on CPU): a bf16 softmax backward loses ~1e-2.
    return _scaled(
        lambda t: jax.nn.softmax(t.astype(jnp.float32) * mult, axis=axis).astype(t.dtype),
        x, output_scale, grad_scale)


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
    # alpha = beta: s * dropout(x) with the ordinary gradient (dropout is linear in x)
    y = plain.dropout(x, rate, rng=rng, deterministic=deterministic)
    return y if scale == 1.0 else y * jnp.asarray(scale, y.dtype)
