"""TPU flash attention (Pallas): ``implementation="pallas_tpu"`` of
``ops.plain.dot_product_attention``, the only caller (the attention maths and its checks live
there; this module adapts the kernel).

The kernel is ``jax.experimental.pallas.ops.tpu.flash_attention.flash_attention`` (the
FlashAttention forward and backward of Dao et al., 2022, written in Pallas for TPU; shipped
with jax, so it moves with the jax version and adds no dependency). ``tokamax`` (a separate
Pallas kernel library, version 0.0.x) was weighed and not taken: one more young dependency
whose API still changes, for a kernel jax already ships.

What the adapter does around the kernel (whose layout is ``[batch, heads, seq, head_dim]``):

- GQA / MQA: the kernel needs as many kv heads as query heads, so k and v are repeated
  (``jnp.repeat`` along heads; their gradients are summed back by autodiff).
- Lengths: the kernel needs ``q_len`` a multiple of its query block and ``kv_len`` of its
  key block (itself a multiple of 128); q, k, v are zero-padded up to those and the padded
  keys hidden (segment ids), the padded query rows dropped.
- Masks: a key-padding mask (one that broadcasts over heads and queries) becomes the
  kernel's segment ids (query ids 1, kv ids 1 where kept, 0 where hidden); any other mask
  becomes an additive float32 bias ``ab`` of ``[batch, heads, q_len, kv_len]`` (0 kept,
  ``HIDDEN_LOGIT`` hidden), which costs the dense score matrix's memory once.

Limits (checked by ``problem``): a TPU, or the Pallas TPU interpreter on another backend
(``interpret()``); ``head_dim`` below 128 or a multiple of 128; no dropout; ``block_q`` a
multiple of 8 and ``block_kv`` of 128. A query row that sees no key gets a (finite) average
of the values, as under ``"xla"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator, Optional

import jax
import jax.numpy as jnp

F32 = jnp.float32

BLOCK_Q_MULTIPLE = 8
"""The kernel's query blocks are a multiple of the TPU's 8 sublanes."""
BLOCK_KV_MULTIPLE = 128
"""The kernel's key blocks are a multiple of its ``MIN_BLOCK_SIZE`` (128, the TPU's lanes)."""
HEAD_DIM_TILE = 128
"""``head_dim`` must be below this or a multiple of it (the kernel tiles its statistics)."""

HIDDEN_LOGIT = -1e6
"""The logit a masked score gets through the bias ``ab`` (padded keys: twice that, so a row
that sees no key averages the real values, as under ``"xla"``). Far below any real logit,
yet finite and small enough that the kernel's backward stays finite (about ``-1e30`` gives
NaN gradients on a fully masked row)."""

_INTERPRETING: contextvars.ContextVar[bool] = contextvars.ContextVar("pallas_tpu_interpret",
                                                                     default=False)


@contextlib.contextmanager
def interpret() -> Iterator[None]:
    """Runs ``implementation="pallas_tpu"`` in the Pallas TPU interpreter (on any backend,
    e.g. CPU in tests): ``jax.experimental.pallas.tpu.force_tpu_interpret_mode``, which makes
    every ``pallas_call`` traced inside run interpreted. Slow: for tests on small shapes."""
    from jax.experimental.pallas import tpu as pltpu
    token = _INTERPRETING.set(True)
    try:
        with pltpu.force_tpu_interpret_mode():
            yield
    finally:
        _INTERPRETING.reset(token)


def problem(q, k, rate: float, block_q: int, block_kv: int) -> Optional[str]:
    """Why the kernel cannot run these inputs here, or None if it can."""
    if jax.default_backend() != "tpu" and not _INTERPRETING.get():
        return (f"it needs a TPU, the backend is {jax.default_backend()!r} (to run it in the "
                "Pallas TPU interpreter, e.g. in tests, call it inside "
                "unitscale_jax.ops.plain.pallas_tpu_interpret())")
    d = q.shape[-1]
    if d >= HEAD_DIM_TILE and d % HEAD_DIM_TILE:
        return f"head_dim must be below {HEAD_DIM_TILE} or a multiple of it, got {d}"
    if rate > 0.0:
        return "it has no attention dropout"
    if block_q % BLOCK_Q_MULTIPLE or block_kv % BLOCK_KV_MULTIPLE:
        return (f"block_q must be a multiple of {BLOCK_Q_MULTIPLE} and block_kv of "
                f"{BLOCK_KV_MULTIPLE}, got {block_q} and {block_kv}")
    return None


def _round_up(n: int, m: int) -> int:
    return math.ceil(n / m) * m


def _pad(x: jax.Array, axis: int, size: int, value=0) -> jax.Array:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, logit_scale: float,
                    mask: Optional[jax.Array] = None, is_causal: bool = False,
                    block_q: int = 512, block_kv: int = 512) -> jax.Array:
    """``softmax(logit_scale q k^T) v`` by the TPU flash-attention kernel (inputs already
    checked by the caller, ``problem`` None).

    Args:
      q: ``[B, T, H, D]``.
      k: ``[B, S, K, D]`` with ``H`` a multiple of ``K`` (query head ``h`` reads kv head
        ``h // (H // K)``).
      v: like ``k``.
      logit_scale: multiplier of the logits.
      mask: optional boolean mask of rank <= 4 broadcastable to ``[B, H, T, S]``.
      is_causal: key ``s`` is seen by query ``t`` only if ``s <= t``.
      block_q: query block size (a multiple of 8; clipped to ``T`` rounded up to 8).
      block_kv: key block size (a multiple of 128; clipped to ``S`` rounded up to 128).

    Returns:
      ``[B, T, H, D]`` in q's dtype.
    """
    from jax.experimental.pallas.ops.tpu import flash_attention as fa
    b, t, h, d = q.shape
    s_len, n_kv = k.shape[1], k.shape[2]
    bq = min(int(block_q), _round_up(t, BLOCK_Q_MULTIPLE))
    bk = min(int(block_kv), _round_up(s_len, BLOCK_KV_MULTIPLE))
    tp, sp = _round_up(t, bq), _round_up(s_len, bk)
    if n_kv != h:
        k, v = (jnp.repeat(x, h // n_kv, axis=2) for x in (k, v))
    qt = _pad(q.transpose(0, 2, 1, 3), 2, tp)                     # [B, H, Tp, D]
    kt, vt = (_pad(x.transpose(0, 2, 1, 3), 2, sp) for x in (k, v))
    ab = segment_ids = None
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask is not None and (mask.shape[1] != 1 or mask.shape[2] != 1):
        hidden = HIDDEN_LOGIT / abs(float(logit_scale))      # the kernel scales ab too
        ab = jnp.where(jnp.broadcast_to(mask, (b, h, t, s_len)), 0.0, hidden).astype(F32)
        ab = _pad(_pad(ab, 2, tp, 0.0), 3, sp, 2 * hidden)    # padded keys below hidden ones
        ab = jax.lax.stop_gradient(ab)
    elif mask is not None or sp != s_len:
        keys = (jnp.ones((b, s_len), bool) if mask is None
                else jnp.broadcast_to(mask[:, 0, 0, :], (b, s_len)))
        segment_ids = fa.SegmentIds(q=jnp.ones((b, tp), jnp.int32),
                                    kv=_pad(keys, 1, sp, False).astype(jnp.int32))
    sizes = fa.BlockSizes(block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
                          block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
                          block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
    out = fa.flash_attention(qt, kt, vt, ab, segment_ids, causal=bool(is_causal),
                             sm_scale=float(logit_scale), block_sizes=sizes)
    return out[:, :, :t].transpose(0, 2, 1, 3).astype(q.dtype)
