"""Attention patterns: which keys each query sees (sliding windows, block-sparse masks) and
how many.

One definition of the sliding window serves every backend and the KV cache:
``window_keep(t, s, window, is_causal)`` on query and key positions. Causal: query ``t``
sees the ``W`` keys ``t - W + 1 .. t``; bidirectional: the ``W`` keys on each side of it,
``t - W .. t + W`` (``2 W + 1`` keys away from the ends). ``block_sparse_mask`` builds a
BigBird-style static mask (Zaheer et al., 2020: local blocks plus global tokens, without
the random blocks), and ``visible_counts`` gives the number of keys each query sees, which
u-muP's attention scale reads (``ops.attention.attention_scale_from_counts``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np


def check_window(window, op: str) -> Optional[int]:
    """``window`` as an int (or None); a clear error for anything below 1.

    Raises:
      ValueError: a window that is not a positive int.
    """
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"{op}: window must be a positive int (the number of keys each query "
                         f"sees on its side) or None for full attention, got {window!r}.")
    return int(window)


def window_keep(t, s, window: Optional[int], is_causal: bool):
    """Whether query position ``t`` sees key position ``s`` (broadcasting arrays, numpy or
    jax): causal ``s <= t`` and, with a window ``W``, ``t - s < W`` (causal) or
    ``|t - s| <= W`` (bidirectional). With neither, every key is seen."""
    d = t - s
    if window is None:
        return d >= 0 if is_causal else (d == d)
    if is_causal:
        return (d >= 0) & (d < window)
    return (d <= window) & (d >= -window)


def pattern_mask(q_len: int, kv_len: int, *, is_causal: bool = False,
                 window: Optional[int] = None,
                 static_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """The boolean ``[q_len, kv_len]`` numpy mask of a pattern: causal and window rule on
    the indices (query ``t`` at position ``t``), and a static mask."""
    keep = np.asarray(window_keep(np.arange(q_len)[:, None], np.arange(kv_len)[None, :],
                                  window, is_causal))
    keep = np.broadcast_to(keep, (q_len, kv_len))
    return keep if static_mask is None else np.logical_and(keep, static_mask)


def visible_counts(q_len: int, kv_len: int, *, is_causal: bool = False,
                   window: Optional[int] = None,
                   static_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """The number of keys each query sees, ``[q_len]`` ints (``pattern_mask``'s row sums)."""
    return pattern_mask(q_len, kv_len, is_causal=is_causal, window=window,
                        static_mask=static_mask).sum(axis=-1)


def check_static_mask(static_mask, q_len: int, kv_len: int, op: str) -> Optional[np.ndarray]:
    """A static mask as a boolean numpy ``[q_len, kv_len]`` array (or None).

    Raises:
      ValueError: a traced (not concrete) mask, or the wrong shape.
      TypeError: a mask that is not boolean.
    """
    if static_mask is None:
        return None
    try:
        m = np.asarray(static_mask)
    except Exception as e:  # a jax tracer: its values are unknown at trace time
        raise ValueError(f"{op}: static_mask must be concrete (a numpy array, e.g. "
                         f"ops.block_sparse_mask(...)), not traced; pass a traced mask as "
                         f"mask=.") from e
    if m.dtype != np.bool_:
        raise TypeError(f"{op}: static_mask must be boolean (True = attend), got {m.dtype}.")
    if m.shape != (q_len, kv_len):
        raise ValueError(f"{op}: static_mask must have shape (q_len, kv_len) = "
                         f"({q_len}, {kv_len}), got {m.shape}.")
    return m


def block_sparse_mask(seq_len: int, block: int, n_local_blocks: int = 1,
                      n_global_tokens: int = 0, *, causal: bool = False) -> np.ndarray:
    """A BigBird-style block-sparse mask ``[seq_len, seq_len]`` (numpy bool, True = attend).

    The sequence is cut into blocks of ``block`` tokens. Query block ``i`` sees the key
    blocks ``i - n_local_blocks + 1 .. i`` (causal) or ``i - n_local_blocks .. i +
    n_local_blocks`` (bidirectional); the first ``n_global_tokens`` tokens see every key
    and are seen by every query (causal: only queries at or after them, and they see only
    keys up to themselves). Causal masks are also causal inside the blocks.

    Pass it as ``static_mask=`` to ``ops.plain.dot_product_attention`` or
    ``ops.scaled_dot_product_attention``: the chunked backend then skips the blocks it
    leaves empty, and u-muP's scale counts the keys it leaves each query.

    Args:
      seq_len: the sequence length (queries and keys).
      block: block size; must divide ``seq_len``.
      n_local_blocks: key blocks each query block sees on its side (itself included when
        causal; bidirectional: that many on each side besides itself).
      n_global_tokens: the leading tokens that attend and are attended everywhere.
      causal: also apply the causal mask.

    Raises:
      ValueError: a block size that does not divide ``seq_len``, or a negative or
        non-integer count.
    """
    op = "block_sparse_mask"
    for name, v, least in (("seq_len", seq_len, 1), ("block", block, 1),
                           ("n_local_blocks", n_local_blocks, 1),
                           ("n_global_tokens", n_global_tokens, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < least:
            raise ValueError(f"{op}: {name} must be an int >= {least}, got {v!r}.")
    if seq_len % block:
        raise ValueError(f"{op}: block {block} does not divide seq_len {seq_len}; use a "
                         f"block size that divides it (e.g. "
                         f"{max(d for d in range(1, block + 1) if seq_len % d == 0)}) or pad "
                         f"the sequence to a multiple of {block}.")
    pos = np.arange(seq_len)
    qb, kb = pos[:, None] // block, pos[None, :] // block
    if causal:
        local = (qb - kb >= 0) & (qb - kb < n_local_blocks)
    else:
        local = np.abs(qb - kb) <= n_local_blocks
    g = n_global_tokens
    glob = (pos[:, None] < g) | (pos[None, :] < g)
    keep = local | glob
    if causal:
        keep &= pos[None, :] <= pos[:, None]
    return keep


def block_occupancy(q_len: int, kv_len: int, block_q: int, block_kv: int, *,
                    is_causal: bool = False, window: Optional[int] = None,
                    static_mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Which (query block, key block) pairs hold a visible score: ``[n_q_blocks,
    n_kv_blocks]`` bool, the blocks the chunked backend visits (it skips the rest, forward
    and backward).

    Causal and window rules are read from the blocks' position ranges (no ``[q_len,
    kv_len]`` array): query block ``[t0, t1]`` and key block ``[s0, s1]`` meet the pattern
    iff the offsets ``t - s`` they span, ``[t0 - s1, t1 - s0]``, meet the allowed ones
    (causal ``[0, inf)``, causal window ``[0, W - 1]``, bidirectional window ``[-W, W]``).
    A static mask adds its own empty blocks.
    """
    nq, nk = -(-q_len // block_q), -(-kv_len // block_kv)
    t0 = np.arange(nq)[:, None] * block_q
    t1 = np.minimum(t0 + block_q, q_len) - 1
    s0 = np.arange(nk)[None, :] * block_kv
    s1 = np.minimum(s0 + block_kv, kv_len) - 1
    lo_d, hi_d = t0 - s1, t1 - s0
    occ = np.ones((nq, nk), bool)
    if is_causal:
        occ &= hi_d >= 0
    if window is not None:
        occ &= (lo_d <= window - 1) if is_causal else ((lo_d <= window) & (hi_d >= -window))
    if static_mask is not None:
        padded = np.zeros((nq * block_q, nk * block_kv), bool)
        padded[:q_len, :kv_len] = static_mask
        occ &= padded.reshape(nq, block_q, nk, block_kv).any(axis=(1, 3))
    return occ
