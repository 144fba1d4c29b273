"""Unit-scaled dot-product attention on top of ``ops.plain.dot_product_attention`` (XLA,
cuDNN or chunked backends)."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from unitscale_jax.ops import plain
from unitscale_jax.ops._checks import require_range_rate
from unitscale_jax.ops.activations import _check_mult
from unitscale_jax.ops.constraints import logarithmic_interpolation


def attention_scale(seq_len: int, d_head: int, *, mult: float = 1.0, is_causal: bool = False,
                    dropout_rate: float = 0.0) -> float:
    """The single scale ``s`` applied to attention's output and to q, k, v's gradients.

    ``s = sqrt(1 - p) / interp(a, lo, 1)`` with ``a = 1 / (1 + 4 d_head / mult^2)`` and
    ``lo = sqrt(ln S / S)`` if causal else ``sqrt(1 / S)``: with flat attention the output is
    a mean over ``S`` (or, causally, a harmonic ~ ``ln S`` of positions) of unit values; with
    peaked attention it copies one value (u-muP, Blake et al., 2025, appendix).
    """
    a = 1.0 / (1.0 + 4.0 * d_head / mult**2)
    lower = ((math.log(seq_len) if is_causal else 1.0) / seq_len) ** 0.5
    if lower <= 0:  # causal with S == 1: a single position, nothing to average
        lower = 1.0
    return (1.0 - dropout_rate) ** 0.5 / logarithmic_interpolation(a, lower, 1.0)


def scaled_dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    mult: float = 1.0,
    dropout_rate: float = 0.0,
    rng: Optional[jax.Array] = None,
    scale_seq_len: Optional[int] = None,
    scale_is_causal: Optional[bool] = None,
    implementation: Optional[str] = None,
    block_q: int = plain.ATTENTION_BLOCK_Q,
    block_kv: int = plain.ATTENTION_BLOCK_KV,
) -> jax.Array:
    """Unit-scaled multi-head attention ``s * softmax(mult * q k^T / d_head) v``.

    Scaling rule (u-muP, Blake et al., 2025): logits use ``mult / d_head`` (muP's
    ``1/d_head``, not ``1/sqrt(d_head)``); one scale ``s`` (see ``attention_scale``)
    multiplies the output and the gradients of q, k and v.

    Computed as ``s * ops.plain.dot_product_attention(q, k, v, logit_scale=mult / d_head)``
    with whichever backend ``implementation`` picks (XLA's dense attention, cuDNN's fused
    kernel, or the memory-efficient chunked one): one scale on the output and on q, k, v's
    gradients is what the ordinary gradient of ``s * attention`` gives, so every backend gets
    the rule with no custom scale op.

    Args:
      q: ``[batch, q_len, heads, head_dim]`` (or all of q, k, v without the batch axis).
      k: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` must be a multiple of ``kv_heads``.
      v: ``[batch, kv_len, kv_heads, head_dim]``.
      mask: optional boolean mask broadcastable to ``[batch, heads, q_len, kv_len]``, True
        where attention is allowed (padding or arbitrary); combined with ``is_causal``.
      is_causal: apply a causal mask (and the causal scaling rule).
      mult: u-muP's ``alpha_attn-softmax``.
      dropout_rate: attention-probability dropout.
      rng: PRNG key for dropout.
      scale_seq_len: the sequence length ``S`` used by the scaling rule (default
        ``kv_len``). KV-cache decoding passes the full length so that cached and full
        forward passes give the same values.
      scale_is_causal: the causal flag used by the scaling rule (default ``is_causal``).
      implementation: the backend, ``"auto"`` (None), ``"xla"``, ``"cudnn"``, ``"chunked"``
        or ``"pallas_tpu"`` (see ``ops.plain.dot_product_attention`` and
        ``ops.plain.choose_implementation``).
      block_q: query block size of the blockwise backends (chunked, pallas_tpu).
      block_kv: key block size of the blockwise backends (chunked, pallas_tpu).

    Returns:
      ``[batch, q_len, heads, head_dim]``.
    """
    op = "scaled_dot_product_attention"
    if q.ndim == 3 and k.ndim == 3 and v.ndim == 3:  # unbatched [seq, heads, head_dim] (e.g. vmap)
        out = scaled_dot_product_attention(
            q[None], k[None], v[None], mask=mask, is_causal=is_causal, mult=mult,
            dropout_rate=dropout_rate, rng=rng, scale_seq_len=scale_seq_len,
            scale_is_causal=scale_is_causal, implementation=implementation, block_q=block_q,
            block_kv=block_kv)
        return out[0]
    plain.check_attention_inputs(q, k, v, mask, op)
    rate = require_range_rate(dropout_rate, op)
    mult = _check_mult(mult, op)
    d_head = v.shape[-1]
    s_len = scale_seq_len if scale_seq_len is not None else k.shape[1]
    causal_rule = is_causal if scale_is_causal is None else scale_is_causal
    s = attention_scale(s_len, d_head, mult=mult, is_causal=causal_rule, dropout_rate=rate)
    out = plain.dot_product_attention(
        q, k, v, logit_scale=mult / d_head, mask=mask, is_causal=is_causal, dropout_rate=rate,
        rng=rng, implementation=implementation, block_q=block_q, block_kv=block_kv)
    # one scale s on the output and on q, k, v's gradients: s * attention(q, k, v) with its
    # ordinary gradient is exactly that
    return out * jnp.asarray(s, out.dtype)
