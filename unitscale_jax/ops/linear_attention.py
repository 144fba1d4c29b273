"""Unit-scaled linear attention on top of ``ops.plain.linear_attention``.

The op is ``scale_fwd(f(scale_bwd(q, beta_q), scale_bwd(k, beta_k), scale_bwd(v, beta_v)),
alpha)`` with ``f`` the normalised kernelised attention of ``ops.plain.linear_attention``,
``phi(x) = elu(x) + 1``. The four scales are derived below for unit-normal q, k, v and a
unit-normal incoming gradient ``g`` at init (``linear_attention_scales``).

Moments of ``phi`` for ``x ~ N(0, 1)`` (closed form, ``Phi`` the normal CDF):

- ``mu = E[phi] = 1/sqrt(2 pi) + 1/2 + e^(1/2) Phi(-1) = 1.16052``
- ``m2 = E[phi^2] = 1 + 2/sqrt(2 pi) + e^2 Phi(-2) = 1.96599``, so
  ``var = m2 - mu^2 = 0.61918``
- ``E[phi'^2] = 1/2 + e^2 Phi(-2) = 0.66810`` (``phi' = 1`` for ``x > 0``, ``e^x`` below).

The weights of query ``t``, ``w_s = phi(q_t) . phi(k_s)``, are sums of ``D`` positive terms:
almost flat, with a squared coefficient of variation over ``s`` of
``c = var m2 / (D mu^4) = 0.671 / D``. Let ``n`` be the number of keys query ``t`` sees.

- Output: ``o_t = sum_s a_s v_s`` with ``a_s = w_s / sum w`` is a weighted mean of ``n``
  unit values, ``Var o_t = E[sum a_s^2] ~ (1 + c (1 - 1/n)) / n`` (exactly 1 at ``n = 1``).
- ``dv_s = sum_t a_ts g_t``: ``Var = sum_t a_ts^2``, which over ``s`` averages to the same
  mean as the output's: ``beta_v = alpha``.
- ``dphi(q_t) = sum_s phi(k_s) ((v_s - o_t) . g_t) / Z_t`` with ``Z_t = sum_s w_s ~ n D
  mu^2``. The ``mu`` part of ``phi(k_s)`` cancels (``sum_s w_s (v_s - o_t) = 0``), leaving
  ``var`` times ``sum_s |v_s - o_t|^2 ~ D (n - 1)``: ``Var dq ~ var E[phi'^2] (n - 1) /
  (n^2 D mu^4)``.
- ``dphi(k_s) = sum_t phi(q_t) ((v_s - o_t) . g_t) / Z_t``: the terms of different ``t``
  carry independent ``g_t``, nothing cancels: ``m2`` in place of ``var``, ``Var dk ~ m2
  E[phi'^2] (n - 1) / (n^2 D mu^4)`` averaged over the queries that see key ``s``.

Averaged over positions, with ``H = sum_{t<=S} 1/t`` and ``H2 = sum_{t<=S} 1/t^2``:

- causal (``n = t``): ``L_o = (H + c (H - H2)) / S`` (``~ ln S / S``, the flat-softmax
  bound of ``ops.attention_scale``), ``L_qk = (H - H2) / S``;
- bidirectional (``n = S``): ``L_o = (1 + c (1 - 1/S)) / S``, ``L_qk = (S - 1) / S^2``;

and ``alpha = beta_v = L_o^(-1/2)``, ``beta_q = (L_qk var E[phi'^2] / (D mu^4))^(-1/2)``,
``beta_k = (L_qk m2 E[phi'^2] / (D mu^4))^(-1/2)``. The q and k gradients of the plain op are
some 10-30 times smaller than its output (a factor ``~ D^-1/2`` against it), so one tied
scale, as softmax attention uses, cannot make all three unit: each gets its own. Measured
with unit-normal inputs (``tests/ops/test_linear_attention.py``), the output and all three
gradients are within 5% of unit std for ``S`` from 16 to 4096 and ``D`` from 16 to 128,
causal and bidirectional.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import jax

from unitscale_jax.ops import plain
from unitscale_jax.ops._scale import scale_bwd, scale_fwd


def _normal_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


PHI_MEAN = 1.0 / math.sqrt(2.0 * math.pi) + 0.5 + math.exp(0.5) * _normal_cdf(-1.0)
"""``E[elu(x) + 1]`` for ``x ~ N(0, 1)`` (1.16052)."""
PHI_SECOND_MOMENT = 1.0 + 2.0 / math.sqrt(2.0 * math.pi) + math.exp(2.0) * _normal_cdf(-2.0)
"""``E[(elu(x) + 1)^2]`` for ``x ~ N(0, 1)`` (1.96599)."""
PHI_GRAD_SECOND_MOMENT = 0.5 + math.exp(2.0) * _normal_cdf(-2.0)
"""``E[elu'(x)^2]`` for ``x ~ N(0, 1)`` (0.66810)."""


class LinearAttentionScales(NamedTuple):
    """The forward scale ``alpha`` and the backward scales of q, k and v."""

    alpha: float
    beta_q: float
    beta_k: float
    beta_v: float


def linear_attention_scales(seq_len: int, d_head: int, *,
                            is_causal: bool = False) -> LinearAttentionScales:
    """The scales of unit-scaled linear attention (the module docstring derives them).

    Args:
      seq_len: ``S``, the number of keys (causal: of positions).
      d_head: ``D``, the head width.
      is_causal: the causal rule (query ``t`` sees ``t`` keys) or the bidirectional one.

    Returns:
      ``LinearAttentionScales(alpha, beta_q, beta_k, beta_v)``.
    """
    s, d = int(seq_len), int(d_head)
    if s < 1 or d < 1:
        raise ValueError(f"linear_attention_scales: seq_len and d_head must be >= 1, got "
                         f"{seq_len} and {d_head}.")
    var = PHI_SECOND_MOMENT - PHI_MEAN**2
    spread = var * PHI_SECOND_MOMENT / (d * PHI_MEAN**4)     # c: the weights' squared CV
    if is_causal:
        h = sum(1.0 / t for t in range(1, s + 1))
        h2 = sum(1.0 / t**2 for t in range(1, s + 1))
        l_out, l_qk = (h + spread * (h - h2)) / s, (h - h2) / s
    else:
        l_out, l_qk = (1.0 + spread * (1.0 - 1.0 / s)) / s, (s - 1) / s**2
    alpha = l_out ** -0.5
    if l_qk == 0.0:  # one key: the output is that value, q and k get no gradient at all
        return LinearAttentionScales(alpha, 1.0, 1.0, alpha)
    per = l_qk * PHI_GRAD_SECOND_MOMENT / (d * PHI_MEAN**4)
    return LinearAttentionScales(alpha, (per * var) ** -0.5, (per * PHI_SECOND_MOMENT) ** -0.5,
                                 alpha)


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    mask: Optional[jax.Array] = None,
    state: Optional[dict] = None,
    scale_seq_len: Optional[int] = None,
    scale_is_causal: Optional[bool] = None,
    chunk_size: int = plain.LINEAR_ATTENTION_CHUNK,
):
    """Unit-scaled kernelised linear attention, ``phi(x) = elu(x) + 1``.

    Scaling rule (derived in this module's docstring): ``alpha * f(q, k, v)`` with ``f`` =
    ``ops.plain.linear_attention`` (``sum_s (phi(q_t) . phi(k_s)) v_s / sum_s phi(q_t) .
    phi(k_s)``), and gradients ``beta_q``, ``beta_k``, ``beta_v`` times ``f``'s for an
    unscaled incoming gradient, all from ``linear_attention_scales(S, D, is_causal)``.
    O(S) time and memory (causal: prefix sums over chunks).

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` a multiple of ``kv_heads``.
      v: like ``k``.
      is_causal: query ``t`` sees keys ``s <= t``.
      mask: optional key padding mask ``[batch, kv_len]`` or ``[batch, 1, 1, kv_len]``.
      state: causal decoding: the running sums of earlier positions (see
        ``ops.plain.linear_attention``); then ``(output, new_state)`` is returned.
      scale_seq_len: ``S`` of the scaling rule (default ``kv_len``; with a ``state``,
        required: the full length, so cached steps give the values of a full forward pass).
      scale_is_causal: the causal flag of the rule (default ``is_causal``).
      chunk_size: positions per chunk of the causal prefix sums.

    Returns:
      ``[batch, q_len, heads, head_dim]``, or ``(output, new_state)`` when ``state`` is given.
    """
    plain.check_attention_inputs(q, k, v, None, "linear_attention")
    if state is not None and scale_seq_len is None:
        raise ValueError("linear_attention: decoding with a state needs scale_seq_len (the "
                         "full sequence length the scaling rule uses).")
    s_len = k.shape[1] if scale_seq_len is None else scale_seq_len
    causal_rule = is_causal if scale_is_causal is None else scale_is_causal
    sc = linear_attention_scales(s_len, v.shape[-1], is_causal=causal_rule)
    q, k, v = scale_bwd(q, sc.beta_q), scale_bwd(k, sc.beta_k), scale_bwd(v, sc.beta_v)
    out = plain.linear_attention(q, k, v, is_causal=is_causal, mask=mask, state=state,
                                 chunk_size=chunk_size)
    if state is None:
        return scale_fwd(out, sc.alpha)
    out, new_state = out
    return scale_fwd(out, sc.alpha), new_state
