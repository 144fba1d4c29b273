"""The parametrization switch: each op in u-muP form (``unitscale_jax.ops``) or plain form.

The modules call these with their ``parametrization``: ``"umup"`` uses the unit-scaled ops
(linear layers, activations and attention through their fused forms in ``_fused``, which
give the ops' values and gradients at lower cost);
``"sp"`` and ``"mup"`` use the ordinary maths (the same forward functions with no scale ops),
differing from each other only in initialisation, attention logit scale and the readout
multiplier (muP, Yang et al. 2022, table 3: ``1/fan_in`` output multiplier and ``1/d_head``
attention).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from unitscale_jax import ops
from unitscale_jax.nn import _fused
from unitscale_jax.ops._checks import check_ids_in_range
from unitscale_jax.ops.attention import _attention_explicit
from unitscale_jax.ops.losses import _divide_fwd_only


def linear(x, kernel, bias, p: str, constraint="to_output_scale"):
    if p == "umup":
        return _fused.linear(x, kernel, bias, constraint)
    # plain x @ kernel + bias, through the same custom_vjp (all scales 1: its ordinary
    # gradient), so SP / muP models get the same fast CPU backward as u-muP ones
    return _fused.plain_linear(x, kernel, bias, 1.0)


def readout(x, kernel, bias, p: str):
    if p == "umup":
        return _fused.linear(x, kernel, bias, None, readout=True)
    # muP: (x @ kernel + bias) / fan_in
    return _fused.plain_linear(x, kernel, bias, 1.0 / kernel.shape[0] if p == "mup" else 1.0)


def embedding(ids, table, p: str, check_ids: bool):
    if p == "umup":
        return ops.embedding(ids, table, check_ids=check_ids)
    if check_ids:
        check_ids_in_range(ids, table.shape[0], "token ids", "embedding")
    return jnp.take(table, ids, axis=0)


def layer_norm(x, scale, bias, p: str, eps: float):
    if p == "umup":
        return ops.layer_norm(x, scale, bias, eps=eps)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    if scale is not None:
        y = y * scale.astype(x.dtype)
    return y if bias is None else y + bias.astype(x.dtype)


def rms_norm(x, scale, p: str, eps: float):
    if p == "umup":
        return ops.rms_norm(x, scale, eps=eps)
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = x / jnp.sqrt(ms + eps).astype(x.dtype)
    return y if scale is None else y * scale.astype(x.dtype)


def silu_glu(x, gate, p: str, mult: float):
    if p == "umup":
        return _fused.silu_glu(x, gate, mult)
    return x * jax.nn.silu(gate)


def gelu(x, p: str, mult: float):
    if p == "umup":
        return _fused.gelu(x, mult)
    return jax.nn.gelu(x, approximate=False)


def dropout(x, rate: float, rng, deterministic: bool, p: str):
    if p == "umup":
        return ops.dropout(x, rate, rng=rng, deterministic=deterministic)
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout: rng is required when rate > 0 and deterministic=False.")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def attention(q, k, v, p: str, *, mask, is_causal: bool, mult: float, dropout_rate: float,
              rng, scale_seq_len: Optional[int], scale_is_causal: Optional[bool]):
    """Attention in ``[batch, seq, heads, head_dim]`` layout for each parametrization."""
    if p == "umup":
        return _fused.attention(
            q, k, v, mask=mask, is_causal=is_causal, mult=mult, dropout_rate=dropout_rate,
            rng=rng, scale_seq_len=scale_seq_len, scale_is_causal=scale_is_causal)
    d_head = q.shape[-1]
    logit_scale = (mult / d_head) if p == "mup" else 1.0 / math.sqrt(d_head)
    if dropout_rate > 0.0 and rng is None:
        raise ValueError("attention: rng is required when dropout_rate > 0.")
    if dropout_rate > 0.0 or q.dtype == jnp.float16:
        # jax.nn.dot_product_attention has no dropout, and no float16 form on CPU.
        return _attention_explicit(q, k, v, mask, is_causal, logit_scale, dropout_rate, rng)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=logit_scale, is_causal=is_causal)




def cross_entropy(logits, labels, p: str, *, mult: float, where=None, check_ids: bool = False):
    """Mean softmax cross-entropy over the (``where``-selected) positions.

    u-muP: the same values and gradients as ``ops.cross_entropy`` (gradient
    ``(softmax(mult x) - onehot) * V / sqrt(V - 1)`` per counted position, no ``1/N``; tested
    against it), computed as ``logsumexp(x) - x[label]``: unlike ``log_softmax`` followed by
    a gather, this never materialises log-probabilities, which makes a decoder train step
    ~10% faster on CPU. SP / muP: the ordinary mean (``mult`` ignored).
    """
    op = "cross_entropy"
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"{op}: labels shape {labels.shape} must equal logits shape without the "
                         f"class axis, {logits.shape[:-1]}.")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"{op}: labels must be integer ids, got dtype {labels.dtype}.")
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"{op}: need at least 2 classes, got {vocab}.")
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_ or where.shape != labels.shape:
            raise ValueError(f"{op}: where must be boolean with labels' shape {labels.shape}, "
                             f"got {where.dtype}{where.shape}.")
    if check_ids:
        check_ids_in_range(labels, vocab, "labels", op, where=where)
    x = logits
    if p == "umup":
        x = ops.scale_fwd(ops.scale_bwd(x, vocab / (vocab - 1) ** 0.5), float(mult))
    x = x.astype(jnp.float32)
    label_logit = jnp.take_along_axis(x, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    nll = jax.nn.logsumexp(x, axis=-1) - label_logit
    if where is None:
        if p == "umup":
            return ops.scale_fwd(jnp.sum(nll), 1.0 / max(nll.size, 1))
        return jnp.mean(nll)
    total = jnp.sum(jnp.where(where, nll, 0.0))
    count = jnp.maximum(jnp.sum(where), 1).astype(jnp.float32)
    return _divide_fwd_only(total, count) if p == "umup" else total / count
