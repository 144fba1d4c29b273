"""Unit-scaled dot-product attention on top of ``ops.plain.dot_product_attention`` (XLA,
cuDNN or chunked backends)."""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from unitscale_jax.ops import patterns, plain
from unitscale_jax.ops._checks import require_range_rate
from unitscale_jax.ops.activations import _check_mult
from unitscale_jax.ops.constraints import logarithmic_interpolation

EULER_GAMMA = 0.5772156649015329


def _harmonic(n: int) -> float:
    """``H_n = 1 + 1/2 + ... + 1/n`` (exact sum below 64, else the asymptotic series, whose
    error there is below 1e-17)."""
    if n < 64:
        return math.fsum(1.0 / k for k in range(1, n + 1))
    return (math.log(n) + EULER_GAMMA + 1 / (2 * n) - 1 / (12 * n**2) + 1 / (120 * n**4)
            - 1 / (252 * n**6))


def flat_output_variance(seq_len: int, *, is_causal: bool = False,
                         window: Optional[int] = None) -> float:
    """``mean_t 1 / n_t``: the variance of flat (uniform) attention's output over unit,
    independent values, where query ``t`` sees ``n_t`` keys.

    Closed forms (``H_n`` the harmonic number, ``S = seq_len``, ``W = window``):

    - full bidirectional (or a window ``W >= S - 1``, which hides nothing): ``1 / S``;
    - full causal (or ``W >= S``): ``ln S / S``, the reference's (unit-scaling 0.3.5)
      approximation of the exact ``H_S / S`` (``n_t = t + 1``), kept so that these models
      match it;
    - causal window ``W < S``: ``n_t = min(t + 1, W)``, so
      ``(H_W + (S - W) / W) / S``;
    - bidirectional window, ``S >= 2 W + 1``: ``n_t = min(t, W) + min(S - 1 - t, W) + 1``:
      the ``W`` queries at each end see ``W + 1 .. 2 W`` keys, the rest ``2 W + 1``, so
      ``(2 (H_2W - H_W) + (S - 2 W) / (2 W + 1)) / S``;
    - bidirectional window, ``W < S - 1 < 2 W``: ``S - 1 - W`` queries at each end see
      ``W + 1 .. S - 1`` keys, the ``2 W - S + 2`` in the middle all ``S``, so
      ``(2 (H_{S-1} - H_W) + (2 W - S + 2) / S) / S``.

    The window forms are exact: they equal ``mean(1 / visible_counts(...))``
    (``attention_scale_from_counts``), which tests check for every ``W`` and ``S``.
    """
    s_len = int(seq_len)
    w = window
    if is_causal and (w is None or w >= s_len):
        return math.log(s_len) / s_len
    if not is_causal and (w is None or w >= s_len - 1):
        return 1.0 / s_len
    if is_causal:
        return (_harmonic(w) + (s_len - w) / w) / s_len
    if s_len >= 2 * w + 1:
        return (2 * (_harmonic(2 * w) - _harmonic(w)) + (s_len - 2 * w) / (2 * w + 1)) / s_len
    return (2 * (_harmonic(s_len - 1) - _harmonic(w)) + (2 * w - s_len + 2) / s_len) / s_len


def _scale_from_variance(variance: float, d_head: int, mult: float, dropout_rate: float):
    """The rule itself: ``sqrt(1 - p) / interp(a, sqrt(variance), 1)``."""
    a = 1.0 / (1.0 + 4.0 * d_head / mult**2)
    lower = variance ** 0.5
    if lower <= 0:  # causal with S == 1: a single position, nothing to average
        lower = 1.0
    return (1.0 - dropout_rate) ** 0.5 / logarithmic_interpolation(a, lower, 1.0)


def attention_scale(seq_len: int, d_head: int, *, mult: float = 1.0, is_causal: bool = False,
                    dropout_rate: float = 0.0, window: Optional[int] = None) -> float:
    """The single scale ``s`` applied to attention's output and to q, k, v's gradients.

    ``s = sqrt(1 - p) / interp(a, lo, 1)`` with ``a = 1 / (1 + 4 d_head / mult^2)`` and
    ``lo = sqrt(mean_t 1 / n_t)`` (``flat_output_variance``), ``n_t`` the keys query ``t``
    sees: with flat attention the output is a mean of ``n_t`` unit values (std
    ``n_t^-1/2``), with peaked attention it copies one value (u-muP, Blake et al., 2025,
    appendix). Full attention gives the reference's ``lo = sqrt(1 / S)`` (bidirectional)
    and ``sqrt(ln S / S)`` (causal, ``mean_t 1/(t+1) ~ ln S / S``); a sliding ``window``
    generalises both (see ``flat_output_variance`` for the closed forms).
    """
    var = flat_output_variance(seq_len, is_causal=is_causal, window=window)
    return _scale_from_variance(var, d_head, mult, dropout_rate)


def attention_scale_from_counts(n_visible, d_head: int, *, mult: float = 1.0,
                                dropout_rate: float = 0.0) -> float:
    """``attention_scale`` for any pattern, from the number of keys each query sees:
    ``lo = sqrt(mean_t 1 / n_t)`` over the queries that see a key (the others output zeros).

    ``n_visible`` comes from ``ops.patterns.visible_counts`` (e.g. of a
    ``block_sparse_mask``). Every window's counts give ``attention_scale(..., window=W)``
    (its exact closed form), except the causal ones that hide nothing (``W >= S``), where
    ``attention_scale`` keeps the reference's ``ln S`` for ``H_S``.

    Raises:
      ValueError: no query sees any key.
    """
    n = np.asarray(n_visible, np.float64).reshape(-1)
    n = n[n > 0]
    if n.size == 0:
        raise ValueError("attention_scale_from_counts: no query sees any key; the pattern "
                         "masks everything.")
    return _scale_from_variance(float(np.mean(1.0 / n)), d_head, mult, dropout_rate)


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
    window: Optional[int] = None,
    static_mask: Optional[np.ndarray] = None,
    scale_window: Optional[int] = None,
) -> jax.Array:
    """Unit-scaled multi-head attention ``s * softmax(mult * q k^T / d_head) v``.

    Scaling rule (u-muP, Blake et al., 2025): logits use ``mult / d_head`` (muP's
    ``1/d_head``, not ``1/sqrt(d_head)``); one scale ``s`` (see ``attention_scale``)
    multiplies the output and the gradients of q, k and v. ``s`` follows the pattern: flat
    attention over the ``n_t`` keys query ``t`` sees has output std ``sqrt(mean_t 1/n_t)``,
    in closed form for a sliding ``window`` (``flat_output_variance``) and counted for a
    ``static_mask`` (``attention_scale_from_counts``).

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
      window: sliding-window attention: query ``t`` sees keys ``t - W + 1 .. t`` (causal)
        or ``t - W .. t + W`` (``ops.patterns.window_keep``); the scale then uses the
        window's ``mean_t 1/n_t`` (``attention_scale``'s ``window``).
      static_mask: a static boolean ``[q_len, kv_len]`` numpy mask (e.g.
        ``ops.patterns.block_sparse_mask``), combined with the others; the scale then comes
        from the keys each query sees under it, causal and ``window``
        (``attention_scale_from_counts``; ``scale_seq_len`` and ``scale_window`` do not
        apply).
      scale_window: the window used by the scaling rule (default ``window``); a KV cache
        that applies the window through ``mask`` passes it here.

    Returns:
      ``[batch, q_len, heads, head_dim]``.
    """
    op = "scaled_dot_product_attention"
    if q.ndim == 3 and k.ndim == 3 and v.ndim == 3:  # unbatched [seq, heads, head_dim] (e.g. vmap)
        out = scaled_dot_product_attention(
            q[None], k[None], v[None], mask=mask, is_causal=is_causal, mult=mult,
            dropout_rate=dropout_rate, rng=rng, scale_seq_len=scale_seq_len,
            scale_is_causal=scale_is_causal, implementation=implementation, block_q=block_q,
            block_kv=block_kv, window=window, static_mask=static_mask,
            scale_window=scale_window)
        return out[0]
    plain.check_attention_inputs(q, k, v, mask, op)
    rate = require_range_rate(dropout_rate, op)
    mult = _check_mult(mult, op)
    d_head = v.shape[-1]
    s_len = scale_seq_len if scale_seq_len is not None else k.shape[1]
    causal_rule = is_causal if scale_is_causal is None else scale_is_causal
    window = patterns.check_window(window, op)
    rule_window = window if scale_window is None else patterns.check_window(scale_window, op)
    if static_mask is not None:
        static_mask = patterns.check_static_mask(static_mask, q.shape[1], k.shape[1], op)
        counts = patterns.visible_counts(q.shape[1], k.shape[1], is_causal=is_causal,
                                         window=window, static_mask=static_mask)
        s = attention_scale_from_counts(counts, d_head, mult=mult, dropout_rate=rate)
    else:
        s = attention_scale(s_len, d_head, mult=mult, is_causal=causal_rule, dropout_rate=rate,
                            window=rule_window)
    out = plain.dot_product_attention(
        q, k, v, logit_scale=mult / d_head, mask=mask, is_causal=is_causal, dropout_rate=rate,
        rng=rng, implementation=implementation, block_q=block_q, block_kv=block_kv,
        window=window, static_mask=static_mask)
    # one scale s on the output and on q, k, v's gradients: s * attention(q, k, v) with its
    # ordinary gradient is exactly that
    return out * jnp.asarray(s, out.dtype)
