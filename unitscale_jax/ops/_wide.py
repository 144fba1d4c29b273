"""Parameter gradients that sum over tokens, accumulated in float32 and scaled before the cast.

A weight's gradient sums over every token of the batch: ``dW = x^T g`` over ``B`` rows, and
unit scaling multiplies it by ``B^-1/2`` (Blake et al., 2023, table A.2). Written as
``scale_bwd(W, B^-1/2)`` in front of the product, autodiff computes ``x^T g`` in the operands'
dtype first and scales afterwards. In float16 that intermediate overflows once the batch is
large: at 16k tokens the readout's ``x^T g`` already exceeds float16's 65504 and the step
is lost to ``inf``, although the scaled result is of order 1. (bfloat16 has float32's range
and only loses precision.) The functions here have the same forward values and, in exact
arithmetic, the same gradients as that composition (``scaled_affine`` also applies the forward
scale to the kernel rather than the output: the same maths); their backward passes accumulate
each token sum in float32 (``preferred_element_type`` / ``dtype=float32``), apply the scale
there, and only then cast to the parameter's dtype, as fused low-precision kernels do.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def _rows(a: jax.Array, width: int) -> jax.Array:
    return a.reshape(-1, width)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def scaled_affine(x, kernel, bias, alpha: float, beta_x: float, beta_w: float):
    """``alpha * (x @ kernel + bias)`` whose gradients are ``beta_x g kernel^T`` (x),
    ``beta_w x^T g`` (kernel) and ``beta_w sum g`` (bias).

    Every scale multiplies a weight-sized tensor only: ``alpha`` the kernel and bias in the
    forward pass, ``beta_x`` the kernel in the input-gradient matmul, ``beta_w`` the
    ``[fan_in, fan_out]`` kernel gradient, which sums over every row in float32 and is cast
    to the kernel's dtype after scaling. The explicit backward (``dx = g W^T``, ``dW = x^T g``
    on 2-D views) also runs faster on XLA:CPU than autodiff of ``jnp.matmul``. With all three
    scales equal to ``m`` it is ``m * (x @ kernel + bias)`` with its ordinary gradient.
    """
    y = jnp.matmul(x, kernel * jnp.asarray(alpha, kernel.dtype))
    return y if bias is None else y + bias * jnp.asarray(alpha, bias.dtype)


def _scaled_affine_fwd(x, kernel, bias, alpha, beta_x, beta_w):
    return scaled_affine(x, kernel, bias, alpha, beta_x, beta_w), (x, kernel, bias)


def kernel_and_bias_grads(x, g, kernel, bias, beta_w: float):
    """``beta_w x^T g`` and ``beta_w sum g`` over all rows, summed in float32, in the kernel's
    and bias's dtypes."""
    fan_in, fan_out = kernel.shape
    g2 = _rows(g, fan_out)
    # contracting the rows directly, as autodiff's transpose does (no materialised x^T)
    dk = lax.dot_general(_rows(x, fan_in), g2, (((0,), (0,)), ((), ())),
                         preferred_element_type=F32) * beta_w
    db = None if bias is None else (jnp.sum(g2, axis=0, dtype=F32) * beta_w).astype(bias.dtype)
    return dk.astype(kernel.dtype), db


def _scaled_affine_bwd(alpha, beta_x, beta_w, res, g):
    del alpha
    x, kernel, bias = res
    # sums over fan_out only: the operands' dtype
    dx = lax.dot_general(g, kernel * jnp.asarray(beta_x, kernel.dtype),
                         (((g.ndim - 1,), (1,)), ((), ())))
    return (dx.astype(x.dtype), *kernel_and_bias_grads(x, g, kernel, bias, beta_w))


scaled_affine.defvjp(_scaled_affine_fwd, _scaled_affine_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def gather_rows(table, ids, beta: float):
    """``table[ids]``; the table's gradient ``beta`` times the per-row sums of ``g``."""
    return jnp.take(table, ids, axis=0)


def _gather_fwd(table, ids, beta):
    return gather_rows(table, ids, beta), (table, ids)


def _gather_bwd(beta, res, g):
    table, ids = res
    d = jnp.zeros(table.shape, F32).at[ids].add(g.astype(F32)) * beta
    return d.astype(table.dtype), None


gather_rows.defvjp(_gather_fwd, _gather_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def mul_param(y, p, beta: float):
    """``y * p`` for a ``[d]`` parameter ``p`` broadcast over ``y[..., d]``; ``p``'s gradient
    ``beta * sum(g * y)`` over the leading axes."""
    return y * p.astype(y.dtype)


def _mul_fwd(y, p, beta):
    return mul_param(y, p, beta), (y, p)


def _mul_bwd(beta, res, g):
    y, p = res
    dp = jnp.sum(_rows(g.astype(F32) * y.astype(F32), p.shape[-1]), axis=0) * beta
    return (g * p.astype(g.dtype)).astype(y.dtype), dp.astype(p.dtype)


mul_param.defvjp(_mul_fwd, _mul_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def add_param(y, p, beta: float):
    """``y + p`` for a ``[d]`` parameter ``p``; ``p``'s gradient ``beta * sum(g)``."""
    return y + p.astype(y.dtype)


def _add_fwd(y, p, beta):
    return add_param(y, p, beta), p


def _add_bwd(beta, p, g):
    dp = jnp.sum(_rows(g, p.shape[-1]), axis=0, dtype=F32) * beta
    return g, dp.astype(p.dtype)


add_param.defvjp(_add_fwd, _add_bwd)
