"""Memory-efficient ("chunked") softmax attention in pure JAX: ``implementation="chunked"`` of
``ops.plain.dot_product_attention``, the only caller (the attention maths and its checks live
there; this module is the kernel).

Forward (FlashAttention, Dao et al., 2022): for each block of queries, a loop over blocks of
keys keeps a running row maximum ``m``, a running row sum ``l`` of ``exp(s - m)`` and the
running output, rescaled by ``exp(m_old - m_new)`` whenever the maximum grows (the "online
softmax"), so no ``[q_len, kv_len]`` score matrix exists at once. Backward (FlashAttention-2,
Dao, 2023): a ``jax.custom_vjp`` that keeps only the output and the per-row logsumexp and
recomputes each block of scores, ``p = exp(s - lse)``, ``ds = p * (dp - rowsum(do * o))``.

Scores, softmax statistics and gradient accumulators are float32 whatever the input dtype;
matmul operands keep the input dtype (probabilities are cast to it before ``p @ v``, as in
FlashAttention). Causal attention skips the key blocks (forward) and query blocks (backward)
that lie wholly above the diagonal; a sliding window skips those wholly outside the window
and a static mask its empty blocks (``ops.patterns.block_occupancy``: each query block loops
over its list of visited key blocks, each key block over its query blocks), so a window of
``W`` costs ``O(T W)``, not ``O(T S)``. A row that sees no key at all gives a zero output and zero
gradients (not NaN).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from unitscale_jax.ops import patterns

F32 = jnp.float32


class _Schedule:
    """The visited blocks (``patterns.block_occupancy``) as index tables, hashable so that
    it can be a static argument of the ``custom_vjp``."""

    def __init__(self, occ: np.ndarray):
        self.occ = occ
        self._key = (occ.shape, occ.tobytes())

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Schedule) and self._key == other._key

    @staticmethod
    def _tables(occ):
        counts = occ.sum(axis=1)
        index = np.zeros((occ.shape[0], max(int(counts.max(initial=0)), 1)), np.int32)
        for i, row in enumerate(occ):
            nz = np.flatnonzero(row)
            index[i, :nz.size] = nz
        return jnp.asarray(index), jnp.asarray(counts.astype(np.int32))

    def key_blocks(self):
        """``[nq, max]`` key-block indices per query block and their counts ``[nq]``."""
        return self._tables(self.occ)

    def query_blocks(self):
        """``[nk, max]`` query-block indices per key block and their counts ``[nk]``."""
        return self._tables(self.occ.T)


def _pad(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _block(x, start, size: int, axis: int):
    """``x[..., start:start + size, ...]`` along ``axis``, or ``x`` if that axis is broadcast."""
    if x.shape[axis] == 1:
        return x
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _keep(mask, qs, ks, bq: int, bk: int, kv_len: int, causal: bool, window=None):
    """Which scores of the block at (query ``qs``, key ``ks``) count: ``[.., bq, bk]``."""
    t = qs + jnp.arange(bq)[:, None]
    s = ks + jnp.arange(bk)[None, :]
    keep = s < kv_len                                   # the key padding
    if causal or window is not None:
        keep = jnp.logical_and(keep, patterns.window_keep(t, s, window, causal))
    keep = keep[None, None, None]                       # [1, 1, 1, bq, bk]
    if mask is not None:
        keep = jnp.logical_and(keep, _block(_block(mask, qs, bq, 3), ks, bk, 4))
    return keep


def _scores(q_blk, k_blk, scale: float):
    """``scale * q k^T`` of one block in float32: ``[B, K, G, bq, bk]``."""
    return jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=F32) * scale


def _forward(q, k, v, mask, scale, causal, bq, bk, kv_len, window, sched):
    """Output ``[B, K, G, Tp, D]`` (q's dtype) and row logsumexp ``[B, K, G, Tp]`` (float32)."""
    nq = q.shape[3] // bq
    k_index, k_count = sched.key_blocks()

    def one_query_block(i):
        qs = i * bq
        q_blk = jax.lax.dynamic_slice_in_dim(q, qs, bq, axis=3)

        def step(jj, carry):
            acc, m, l = carry
            ks = k_index[i, jj] * bk
            k_blk = jax.lax.dynamic_slice_in_dim(k, ks, bk, axis=2)
            v_blk = jax.lax.dynamic_slice_in_dim(v, ks, bk, axis=2)
            keep = _keep(mask, qs, ks, bq, bk, kv_len, causal, window)
            s = jnp.where(keep, _scores(q_blk, k_blk, scale), -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)   # no key seen yet: 0
            p = jnp.exp(s - m_safe[..., None])                     # masked: exp(-inf) = 0
            alpha = jnp.exp(m - m_safe)
            acc = alpha[..., None] * acc + jnp.einsum(
                "bkgqs,bksd->bkgqd", p.astype(v.dtype), v_blk, preferred_element_type=F32)
            return acc, m_new, alpha * l + jnp.sum(p, axis=-1)

        # *_like: the carries take q's sharding (a loop under an explicit-sharding mesh
        # needs carries typed like the body's outputs)
        row = q_blk[..., 0]
        init = (jnp.zeros_like(q_blk, F32), jnp.full_like(row, -jnp.inf, F32),
                jnp.zeros_like(row, F32))
        acc, m, l = jax.lax.fori_loop(0, k_count[i], step, init)
        seen = l > 0
        out = acc / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(one_query_block, jnp.arange(nq))   # [nq, B, K, G, bq, (D)]
    out = jnp.moveaxis(out, 0, 3).reshape(q.shape)
    lse = jnp.moveaxis(lse, 0, 3).reshape(q.shape[:4])
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9, 10))
def _attention(q, k, v, mask, scale, causal, bq, bk, kv_len, window, sched):
    return _forward(q, k, v, mask, scale, causal, bq, bk, kv_len, window, sched)[0]


def _attention_fwd(q, k, v, mask, scale, causal, bq, bk, kv_len, window, sched):
    out, lse = _forward(q, k, v, mask, scale, causal, bq, bk, kv_len, window, sched)
    return out, (q, k, v, mask, out, lse)


def _attention_bwd(scale, causal, bq, bk, kv_len, window, sched, res, do):
    q, k, v, mask, out, lse = res
    nk = k.shape[2] // bk
    q_index, q_count = sched.query_blocks()
    delta = jnp.sum(do.astype(F32) * out.astype(F32), axis=-1)       # rowsum(do * o)

    def key_block(j, carry):
        dq, dk, dv = carry
        ks = j * bk
        k_blk = jax.lax.dynamic_slice_in_dim(k, ks, bk, axis=2)
        v_blk = jax.lax.dynamic_slice_in_dim(v, ks, bk, axis=2)

        def query_block(ii, inner):
            dq, dk_j, dv_j = inner
            qs = q_index[j, ii] * bq
            q_blk = jax.lax.dynamic_slice_in_dim(q, qs, bq, axis=3)
            do_blk = jax.lax.dynamic_slice_in_dim(do, qs, bq, axis=3)
            lse_blk = jax.lax.dynamic_slice_in_dim(lse, qs, bq, axis=3)
            delta_blk = jax.lax.dynamic_slice_in_dim(delta, qs, bq, axis=3)
            keep = _keep(mask, qs, ks, bq, bk, kv_len, causal, window)
            s = _scores(q_blk, k_blk, scale)
            p = jnp.where(keep, jnp.exp(jnp.where(keep, s, 0.0) - lse_blk[..., None]), 0.0)
            dv_j = dv_j + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(do.dtype), do_blk,
                                     preferred_element_type=F32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_blk, v_blk, preferred_element_type=F32)
            ds = (p * (dp - delta_blk[..., None]) * scale).astype(q.dtype)
            dq_blk = jnp.einsum("bkgqs,bksd->bkgqd", ds, k_blk, preferred_element_type=F32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, qs, bq, axis=3) + dq_blk, qs, axis=3)
            dk_j = dk_j + jnp.einsum("bkgqs,bkgqd->bksd", ds, q_blk, preferred_element_type=F32)
            return dq, dk_j, dv_j

        zeros = jnp.zeros_like(k_blk, F32)
        dq, dk_j, dv_j = jax.lax.fori_loop(0, q_count[j], query_block, (dq, zeros, zeros))
        dk = jax.lax.dynamic_update_slice_in_dim(dk, dk_j, ks, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(dv, dv_j, ks, axis=2)
        return dq, dk, dv

    init = (jnp.zeros_like(q, F32), jnp.zeros_like(k, F32), jnp.zeros_like(v, F32))
    dq, dk, dv = jax.lax.fori_loop(0, nk, key_block, init)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, logit_scale: float,
                      mask: Optional[jax.Array] = None, is_causal: bool = False,
                      block_q: int = 512, block_kv: int = 512, window: Optional[int] = None,
                      static_mask: Optional[np.ndarray] = None) -> jax.Array:
    """``softmax(logit_scale q k^T) v`` by blocks (inputs already checked by the caller).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, K, D]`` with ``H`` a multiple of ``K`` (query head ``h`` reads kv head
        ``h // (H // K)``).
      v: like ``k``.
      logit_scale: multiplier of the logits.
      mask: optional boolean mask of rank <= 4 broadcastable to ``[B, H, T, S]`` (not
        broadcast here: only its blocks are read).
      is_causal: key ``s`` is seen by query ``t`` only if ``s <= t``.
      block_q: query block size (clipped to ``T``).
      block_kv: key block size (clipped to ``S``).
      window: sliding window (``ops.patterns.window_keep``); key blocks outside it are
        skipped.
      static_mask: a static numpy ``[T, S]`` mask; its empty blocks are skipped.

    Returns:
      ``[B, T, H, D]`` in q's dtype.
    """
    b, t, h, d = q.shape
    s_len, n_kv = k.shape[1], k.shape[2]
    g = h // n_kv
    bq, bk = max(1, min(int(block_q), t)), max(1, min(int(block_kv), s_len))
    tp, sp = math.ceil(t / bq) * bq, math.ceil(s_len / bk) * bk
    qt = _pad(q.reshape(b, t, n_kv, g, d).transpose(0, 2, 3, 1, 4), 3, tp)   # [B, K, G, Tp, D]
    kt = _pad(k.transpose(0, 2, 1, 3), 2, sp)                                # [B, K, Sp, D]
    vt = _pad(v.transpose(0, 2, 1, 3), 2, sp)
    sched = _Schedule(patterns.block_occupancy(t, s_len, bq, bk, is_causal=bool(is_causal),
                                               window=window, static_mask=static_mask))
    if static_mask is not None:
        static = jnp.asarray(static_mask)[None, None]
        mask = static if mask is None else jnp.logical_and(
            mask.reshape((1,) * (4 - mask.ndim) + mask.shape), static)
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)            # [b, h, t, s]
        mb, mh, mt, ms = mask.shape
        mask = mask.reshape(mb, n_kv, g, mt, ms) if mh == h else mask[:, :, None]
        if mt != 1:
            mask = _pad(mask, 3, tp, False)
        if ms != 1:
            mask = _pad(mask, 4, sp, False)
    out = _attention(qt, kt, vt, mask, float(logit_scale), bool(is_causal), bq, bk, s_len,
                     window, sched)
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)
