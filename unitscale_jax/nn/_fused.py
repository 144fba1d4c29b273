"""u-muP ops in fused form: the values and gradients of ``unitscale_jax.ops``, cheaper to run.

Why: XLA:CPU fuses the separate scale multiplies of ``scale_fwd`` / ``scale_bwd`` into its
transposes and recomputes the surrounding elementwise work there, which made a u-muP decoder
train step up to 1.8x slower than the same model without scale ops (measured at d_model 256,
batch 16 x 256). Two rewrites remove the extra multiplies, with identical maths:

- An op whose scales are all equal (``silu_glu``; ``gelu`` with ``"to_output_scale"``;
  attention, whose one scale ``s`` multiplies the output and the q, k, v gradients) is
  exactly ``s * f(x)`` with its ordinary gradient: forward-scaling by ``s`` and letting the
  gradient through unscaled, then scaling each input gradient by ``s``, is what autodiff of
  ``s * f`` computes. So it is written as ``s * f(x)``.
- ``linear`` / ``linear_readout`` become one ``custom_vjp`` that applies ``alpha`` to the
  kernel (forward), ``beta_x`` to the kernel (input gradient) and ``beta_w`` to the
  ``[fan_in, fan_out]`` kernel gradient, i.e. only ever scales weight-sized tensors. Its
  explicit backward (``dx = g @ W^T``, ``dW = x^T @ g`` on 2-D views) also runs faster on
  XLA:CPU than autodiff of ``jnp.matmul``, so the SP / muP twins use it too (``plain_linear``,
  all scales equal: the ordinary gradient).

``tests/nn/test_layers.py`` checks every function here against the op it replaces (values and
gradients, float32 rounding only).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from unitscale_jax import ops
from unitscale_jax.ops import _wide
from unitscale_jax.ops.activations import gelu_scales
from unitscale_jax.ops.constraints import apply_constraint, logarithmic_interpolation


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _scaled_linear(x, kernel, bias, alpha, beta_x, beta_w):
    y = jnp.matmul(x, kernel * jnp.asarray(alpha, kernel.dtype))
    return y if bias is None else y + bias * jnp.asarray(alpha, bias.dtype)


def _scaled_linear_fwd(x, kernel, bias, alpha, beta_x, beta_w):
    return _scaled_linear(x, kernel, bias, alpha, beta_x, beta_w), (x, kernel, bias)


def _scaled_linear_bwd(alpha, beta_x, beta_w, res, g):
    x, kernel, bias = res
    dx = jnp.matmul(g, (kernel * jnp.asarray(beta_x, kernel.dtype)).T)
    # token sums accumulated and scaled in float32 (float16 overflows at large batches before
    # beta_w = B^-1/2 is applied otherwise)
    return (dx.astype(x.dtype), *_wide.kernel_and_bias_grads(x, g, kernel, bias, beta_w))


_scaled_linear.defvjp(_scaled_linear_fwd, _scaled_linear_bwd)


def linear(x, kernel, bias, constraint, *, readout: bool = False):
    """``ops.linear`` (or ``ops.linear_readout``) in fused form; same checks, same scales."""
    op = "linear_readout" if readout else "linear"
    if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        return (ops.linear_readout if readout else ops.linear)(x, kernel, bias, constraint=constraint)
    for name, t in (("x", x), ("kernel", kernel), ("bias", bias)):
        if t is not None and not jnp.issubdtype(t.dtype, jnp.floating):
            raise TypeError(f"{op}: {name} must be a floating-point array, got dtype {t.dtype}.")
    fan_in, fan_out = kernel.shape
    if bias is not None and bias.shape != (fan_out,):
        raise ValueError(f"{op}: bias must have shape ({fan_out},), got {bias.shape}.")
    batch = max(x.size // fan_in, 1)
    alpha, beta_x = apply_constraint(constraint, fan_in ** -(1.0 if readout else 0.5), fan_out ** -0.5)
    return _scaled_linear(x, kernel, bias, float(alpha), float(beta_x), float(batch ** -0.5))


def plain_linear(x, kernel, bias, mult: float = 1.0):
    """``mult * (x @ kernel + bias)`` with its ordinary gradient, via ``_scaled_linear``."""
    if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"linear: kernel {kernel.shape} ([fan_in, fan_out]) does not match x {x.shape}.")
    return _scaled_linear(x, kernel, bias, float(mult), float(mult), float(mult))


def silu_glu(x, gate, mult: float):
    """``ops.silu_glu`` as ``s * x * silu(gate)`` (its one scale ``s`` on output and inputs)."""
    if x.shape != gate.shape:
        return ops.silu_glu(x, gate, mult=mult)
    s = logarithmic_interpolation(1.0 / (1.0 + 1.0 / mult**2), 2.0, 2.0**0.5)
    act = jax.nn.silu(gate) if mult == 1.0 else gate * jax.nn.sigmoid(gate * mult)
    return (x * jnp.asarray(s, x.dtype)) * act


def gelu(x, mult: float):
    """``ops.gelu`` with ``"to_output_scale"`` as ``alpha * gelu(mult x) / mult``."""
    alpha, _ = apply_constraint("to_output_scale", *gelu_scales(mult))
    y = jax.nn.gelu(x, approximate=False) if mult == 1.0 else jax.nn.gelu(x * mult, approximate=False) / mult
    return y * jnp.asarray(alpha, y.dtype)


def attention(q, k, v, *, mask, is_causal: bool, mult: float, dropout_rate: float, rng,
              scale_seq_len: Optional[int], scale_is_causal: Optional[bool]):
    """``ops.scaled_dot_product_attention`` as ``s * attention(q, k, v)`` (one scale ``s`` on
    output and q, k, v gradients); dropout, float16 on CPU and unusual inputs use the op."""
    plain_case = (dropout_rate == 0.0 and q.ndim == 4 and k.shape == v.shape
                  and q.shape[2] == k.shape[2] and q.shape[0] == k.shape[0]
                  and q.shape[3] == k.shape[3]
                  and not (q.dtype == jnp.float16 and jax.default_backend() == "cpu")
                  and (mask is None or (mask.dtype == jnp.bool_ and mask.ndim == 4)))
    if not plain_case:
        return ops.scaled_dot_product_attention(
            q, k, v, mask=mask, is_causal=is_causal, mult=mult, dropout_rate=dropout_rate,
            rng=rng, scale_seq_len=scale_seq_len, scale_is_causal=scale_is_causal)
    d_head = v.shape[-1]
    s_len = scale_seq_len if scale_seq_len is not None else k.shape[1]
    causal_rule = is_causal if scale_is_causal is None else scale_is_causal
    s = ops.attention_scale(s_len, d_head, mult=mult, is_causal=causal_rule)
    if mask is not None:
        mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=mult / d_head,
                                       is_causal=is_causal)
    return out * jnp.asarray(s, out.dtype)
