"""Unit-scaled linear with a pluggable matmul, for the real-FP8 path.

Same scaling rule as ``unitscale_jax.ops.linear`` / ``linear_readout`` (Blake et al., 2023,
section 4.2; u-muP, Blake et al., 2025, section 4.1): ``alpha = fan_in^-p`` (p = 1/2, or 1
for the readout), ``beta_x = fan_out^-1/2``, ``beta_kernel = beta_bias = B^-1/2`` with
``B = x.size / fan_in``, bias added before ``alpha``. ``ops.linear`` hard-codes
``jnp.matmul``; this copy takes the matmul as an argument so that ``fp8_dot`` can run
inside the unchanged scaling, and differentiates through it (so a policy's dot rounds the
gradients it sees). ``tests/precision`` checks it equals ``ops.linear`` (forward exactly,
gradients to float32 rounding: ``ops.linear`` sums its kernel gradient in its own backward,
in float32, which float16 needs at large batches; the policies that reach this path compute
in float32 or bfloat16).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax

from unitscale_jax.ops import apply_constraint, scale_bwd, scale_fwd


def scaled_linear(
    x: jax.Array,
    kernel: jax.Array,
    bias: Optional[jax.Array],
    *,
    dot: Callable[[jax.Array, jax.Array], jax.Array],
    constraint,
    readout: bool,
) -> jax.Array:
    """``scale_fwd(dot(scale_bwd(x, beta_x), scale_bwd(kernel, beta_w)) + bias, alpha)``."""
    op = "linear_readout" if readout else "linear"
    if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"{op}: kernel shape {kernel.shape} (layout [fan_in, fan_out]) does not match the "
            f"last axis of x (shape {x.shape}). A PyTorch weight [out, in] must be transposed."
        )
    fan_in, fan_out = kernel.shape
    if bias is not None and bias.shape != (fan_out,):
        raise ValueError(f"{op}: bias must have shape ({fan_out},), got {bias.shape}.")
    batch = max(x.size // fan_in, 1)
    output_scale = fan_in ** -(1.0 if readout else 0.5)
    grad_x_scale = fan_out ** -0.5
    grad_w_scale = batch ** -0.5
    output_scale, grad_x_scale = apply_constraint(constraint, output_scale, grad_x_scale)
    y = dot(scale_bwd(x, grad_x_scale), scale_bwd(kernel, grad_w_scale))
    if bias is not None:
        y = y + scale_bwd(bias, grad_w_scale).astype(y.dtype)
    return scale_fwd(y, output_scale)
