"""Unit-scaled dot-product attention on top of ``jax.nn.dot_product_attention``."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from unitscale_jax.ops._checks import require_float, require_range_rate, require_rank
from unitscale_jax.ops._scale import scale_bwd, scale_fwd
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


def _attention_explicit(q, k, v, mask, is_causal, logit_scale, rate, rng):
    """Softmax attention written out: used for dropout, and for float16 on CPU (whose dot
    has no float16 x float16 -> float32 form, which ``jax.nn.dot_product_attention`` needs)."""
    n_q, n_kv = q.shape[2], k.shape[2]
    if n_q != n_kv:
        k = jnp.repeat(k, n_q // n_kv, axis=2)
        v = jnp.repeat(v, n_q // n_kv, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32) * logit_scale
    t, s = logits.shape[-2:]
    keep = jnp.ones((t, s), bool)
    if is_causal:
        keep = jnp.tril(keep)
    if mask is not None:
        keep = jnp.logical_and(keep, mask)
    logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if rate > 0.0:
        drop_keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
        probs = jnp.where(drop_keep, probs / (1.0 - rate), 0.0)
    probs = probs.astype(v.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs, v)


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
) -> jax.Array:
    """Unit-scaled multi-head attention ``s * softmax(mult * q k^T / d_head) v``.

    Scaling rule (u-muP, Blake et al., 2025): logits use ``mult / d_head`` (muP's
    ``1/d_head``, not ``1/sqrt(d_head)``); one scale ``s`` (see ``attention_scale``)
    multiplies the output and the gradients of q, k and v.

    Runs on ``jax.nn.dot_product_attention`` so that XLA or cuDNN's fused kernel is used;
    with dropout (which that function lacks) an explicit softmax path is taken.

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
      implementation: passed to ``jax.nn.dot_product_attention`` ("xla", "cudnn" or None).

    Returns:
      ``[batch, q_len, heads, head_dim]``.
    """
    op = "scaled_dot_product_attention"
    if q.ndim == 3 and k.ndim == 3 and v.ndim == 3:  # unbatched [seq, heads, head_dim] (e.g. vmap)
        mask = None if mask is None else jnp.asarray(mask)
        out = scaled_dot_product_attention(
            q[None], k[None], v[None], mask=mask, is_causal=is_causal, mult=mult,
            dropout_rate=dropout_rate, rng=rng, scale_seq_len=scale_seq_len,
            scale_is_causal=scale_is_causal, implementation=implementation)
        return out[0]
    for name, t in (("q", q), ("k", k), ("v", v)):
        require_float(t, name, op)
        require_rank(t, 4, name, op)
    if k.shape != v.shape:
        raise ValueError(f"{op}: k and v must have the same shape, got {k.shape} and {v.shape}.")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(
            f"{op}: q {q.shape} and k {k.shape} must agree on batch and head_dim "
            f"(layout [batch, seq, heads, head_dim])."
        )
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{op}: q heads ({q.shape[2]}) must be a multiple of kv heads ({k.shape[2]}).")
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.dtype != jnp.bool_:
            raise TypeError(f"{op}: mask must be boolean (True = attend), got dtype {mask.dtype}.")
        if mask.ndim > 4:
            raise ValueError(f"{op}: mask must have rank <= 4, got shape {mask.shape}.")
        target = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        try:
            mask = jnp.broadcast_to(mask.reshape((1,) * (4 - mask.ndim) + mask.shape), target)
        except ValueError as e:
            raise ValueError(f"{op}: mask shape {mask.shape} does not broadcast to {target}.") from e
    rate = require_range_rate(dropout_rate, op)
    mult = _check_mult(mult, op)
    d_head = v.shape[-1]
    s_len = scale_seq_len if scale_seq_len is not None else k.shape[1]
    causal_rule = is_causal if scale_is_causal is None else scale_is_causal
    s = attention_scale(s_len, d_head, mult=mult, is_causal=causal_rule, dropout_rate=rate)
    q, k, v = (scale_bwd(t, s) for t in (q, k, v))
    logit_scale = mult / d_head
    if rate > 0.0 and rng is None:
        raise ValueError(f"{op}: rng is required when dropout_rate > 0.")
    if rate > 0.0 or (q.dtype == jnp.float16 and jax.default_backend() == "cpu"):
        out = _attention_explicit(q, k, v, mask, is_causal, logit_scale, rate, rng)
    else:
        out = jax.nn.dot_product_attention(
            q, k, v, mask=mask, scale=logit_scale, is_causal=is_causal,
            implementation=implementation,
        )
    return scale_fwd(out, s)
