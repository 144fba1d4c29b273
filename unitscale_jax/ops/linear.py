"""Unit-scaled linear layers, matrix products and addition.

Kernels use Flax's layout ``[fan_in, fan_out]``. Scales follow Blake et al. (2023), table A.2
and the reference library ``unit-scaling`` 0.3.5 (``unit_scaling.functional``).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from unitscale_jax.ops import _wide, plain
from unitscale_jax.ops._checks import check_linear_inputs, require_float, require_min_rank
from unitscale_jax.ops._scale import row_multiple, scale_bwd, scale_fwd
from unitscale_jax.ops.constraints import Constraint, apply_constraint
from unitscale_jax.ops.plain import DotGeneral


def _linear(x, kernel, bias, constraint, output_power: float, op: str, dot_general):
    check_linear_inputs(x, kernel, bias, op)
    fan_in, fan_out = kernel.shape
    batch = max(x.size // fan_in, 1) * row_multiple()  # the whole batch's (microbatches)
    output_scale = fan_in ** -output_power
    grad_x_scale = fan_out ** -0.5
    grad_w_scale = batch ** -0.5
    output_scale, grad_x_scale = apply_constraint(constraint, output_scale, grad_x_scale)
    if dot_general is None:
        # one custom_vjp scaling only weight-sized tensors, token sums in float32
        return _wide.scaled_affine(x, kernel, bias, output_scale, grad_x_scale, grad_w_scale)
    # a plugged-in matmul (e.g. a precision policy's FP8 dot) is differentiated through, so
    # its own backward (rounded gradients, float8 operands) runs inside the same scales
    bias = None if bias is None else scale_bwd(bias, grad_w_scale)
    y = plain.linear(scale_bwd(x, grad_x_scale), scale_bwd(kernel, grad_w_scale), bias,
                     dot_general=dot_general)
    return scale_fwd(y, output_scale)


def linear(
    x: jax.Array,
    kernel: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    constraint: Constraint = "to_output_scale",
    dot_general: Optional[DotGeneral] = None,
) -> jax.Array:
    """Unit-scaled affine map ``y = alpha * (x @ kernel + bias)``.

    Scaling rule (Blake et al., 2023, section 4.2): ``alpha = fan_in^-1/2``; gradient scales
    ``beta_x = fan_out^-1/2`` and ``beta_kernel = beta_bias = B^-1/2`` with
    ``B = x.size / fan_in`` (the number of rows the kernel's gradient sums over). The bias is
    added before ``alpha``, so it is scaled too. The constraint ties ``alpha`` and
    ``beta_x``; weight gradients are cut edges and keep their own scale.

    Computed as one ``custom_vjp`` that applies every scale to a weight-sized tensor (the
    kernel forward and in the input-gradient matmul, the kernel gradient), with the token
    sums of the kernel and bias gradients accumulated in float32.

    Args:
      x: ``[..., fan_in]`` floating-point input.
      kernel: ``[fan_in, fan_out]`` weight, initialised N(0, 1).
      bias: optional ``[fan_out]`` bias.
      constraint: a name from ``unitscale_jax.ops.constraints`` or None.
      dot_general: optional ``jax.lax.dot_general``-compatible matmul (a precision policy's
        simulated or real FP8 matmul) run inside the same scales and differentiated through;
        None: the fast form above.

    Returns:
      ``[..., fan_out]``, unit variance for unit-variance ``x`` and ``kernel``.
    """
    return _linear(x, kernel, bias, constraint, 0.5, "linear", dot_general)


def linear_readout(
    x: jax.Array,
    kernel: jax.Array,
    bias: Optional[jax.Array] = None,
    *,
    constraint: Constraint = None,
    dot_general: Optional[DotGeneral] = None,
) -> jax.Array:
    """Unit-scaled final (readout) projection: ``alpha = 1 / fan_in``.

    Scaling rule (u-muP, Blake et al., 2025, section 4.1): the output layer uses the muP
    ``1/fan_in`` multiplier, so its output std is ``fan_in^-1/2`` at init; gradient scales
    as in ``linear`` (``beta_x = fan_out^-1/2``, ``beta_kernel = B^-1/2``). The default
    constraint is None: forward and backward scales stay independent (the readout's input
    gradient is a cut edge of the residual stream).

    Args:
      x: ``[..., fan_in]`` floating-point input.
      kernel: ``[fan_in, fan_out]`` weight.
      bias: optional ``[fan_out]`` bias.
      constraint: a constraint name or None.
      dot_general: optional matmul, as in ``linear``.

    Returns:
      ``[..., fan_out]`` logits.
    """
    return _linear(x, kernel, bias, constraint, 1.0, "linear_readout", dot_general)


def matmul(a: jax.Array, b: jax.Array, *, constraint: Constraint = "to_output_scale") -> jax.Array:
    """Unit-scaled matrix product of ``a[..., M, K]`` and ``b[..., K, N]``.

    Scaling rule (Blake et al., 2023, table A.2): ``alpha = K^-1/2``; ``beta_a = N^-1/2``
    (``a``'s gradient sums over N) and ``beta_b = M^-1/2``.

    Args:
      a: ``[..., M, K]``.
      b: ``[..., K, N]``.
      constraint: a three-scale constraint name (e.g. ``"to_output_scale"``,
        ``"to_left_grad_scale"``, ``"gmean"``) or None.

    Returns:
      ``[..., M, N]``.
    """
    require_float(a, "a", "matmul")
    require_float(b, "b", "matmul")
    require_min_rank(a, 2, "a", "matmul")
    require_min_rank(b, 2, "b", "matmul")
    m, k = a.shape[-2:]
    k2, n = b.shape[-2:]
    if k != k2:
        raise ValueError(
            f"matmul: contracting dimensions differ: a has shape {a.shape} (K={k}) and b has "
            f"shape {b.shape} (K={k2})."
        )
    try:
        np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError as e:
        raise ValueError(f"matmul: batch dims of {a.shape} and {b.shape} do not broadcast.") from e
    output_scale, a_scale, b_scale = apply_constraint(constraint, k ** -0.5, n ** -0.5, m ** -0.5)
    a = scale_bwd(a, a_scale)
    b = scale_bwd(b, b_scale)
    return scale_fwd(jnp.matmul(a, b), output_scale)


def add(a, b, *, constraint: Constraint = "to_output_scale"):
    """Unit-scaled addition ``y = alpha * (a + b)``.

    Scaling rule (Blake et al., 2023, table A.2): ``alpha = 2^-1/2`` (two independent
    unit-variance terms); each input's gradient is scaled by ``(broadcast factor)^-1/2``, the
    number of output elements each of its elements feeds. If either side is a Python scalar
    the plain sum is returned; if either is a single element, ``alpha = 1``.

    Args:
      a: array or Python scalar.
      b: array or Python scalar.
      constraint: a three-scale constraint name or None.

    Returns:
      The scaled sum, broadcast to the common shape.
    """
    if isinstance(a, (int, float)) or isinstance(b, (int, float)):
        return a + b
    a, b = jnp.asarray(a), jnp.asarray(b)
    try:
        out_shape = np.broadcast_shapes(a.shape, b.shape)
    except ValueError as e:
        raise ValueError(f"add: shapes {a.shape} and {b.shape} do not broadcast.") from e
    out_size = math.prod(out_shape)
    a_grad_scale = (out_size // max(a.size, 1)) ** -0.5
    b_grad_scale = (out_size // max(b.size, 1)) ** -0.5
    output_scale = 1.0 if (a.size == 1 or b.size == 1) else 2 ** -0.5
    output_scale, a_grad_scale, b_grad_scale = apply_constraint(
        constraint, output_scale, a_grad_scale, b_grad_scale
    )
    return scale_fwd(scale_bwd(a, a_grad_scale) + scale_bwd(b, b_grad_scale), output_scale)
