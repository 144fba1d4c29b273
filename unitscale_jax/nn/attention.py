"""Multi-head attention (self or cross; causal or bidirectional; KV cache; optional RoPE)."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.nn import hooks
from unitscale_jax.nn.config import check_kv_heads, linear_attention_problem
from unitscale_jax.nn.layers import Linear, ParametrizationLike
from unitscale_jax.nn.parametrization import get_parametrization
from unitscale_jax.nn.sharding import constrain
from unitscale_jax.ops import patterns, plain
from unitscale_jax.taps import tap

_QKV_NAMES = ("batch", "sequence", "heads", "kv")
_OWN_WINDOW = object()   # __call__'s default: the module's own window


def rope(x_BxSxHxD: jax.Array, positions_BxS: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary position encoding (Su et al., 2021), "rotate half" layout.

    A rotation of pairs of channels by position-dependent angles: norms are preserved, so
    unit-scale q and k stay unit scale.

    Args:
      x_BxSxHxD: ``[batch, seq, heads, head_dim]`` with an even ``head_dim``.
      positions_BxS: integer positions, broadcastable to ``[batch, seq]``.
      theta: frequency base.

    Returns:
      The rotated array, same shape and dtype.
    """
    d = x_BxSxHxD.shape[-1]
    half = d // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions_BxS.astype(jnp.float32)[..., None] * freq          # [B, S, half]
    sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]  # [B, S, 1, half]
    x = x_BxSxHxD.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxSxHxD.dtype)


class MultiHeadAttention(nnx.Module):
    """Multi-head attention built on ``ops.scaled_dot_product_attention``.

    Self attention uses one fused q/k/v projection whose output axis is laid out head-major
    (``[heads, 3, head_dim]``), so sharding it over ``heads`` keeps each head's q, k and v on
    one device. Cross attention projects q from ``x`` and a fused k/v from ``context``.

    Grouped-query attention (``n_kv_heads`` < ``n_heads``; Ainslie et al., 2023; 1 is
    multi-query attention): ``n_kv_heads`` key/value heads, each read by a group of
    ``n_heads // n_kv_heads`` query heads. The fused projection is then
    ``(n_heads + 2 n_kv_heads) * head_dim`` wide, laid out group-major
    (``[n_kv_heads, group + 2, head_dim]``: a group's query heads, then its k and its v), so
    a shard over ``heads`` still holds whole groups, and ``n_kv_heads = n_heads`` is exactly
    the ``[heads, 3, head_dim]`` layout above. Cross attention's k/v projection is
    ``2 n_kv_heads * head_dim`` wide (``[n_kv_heads, 2, head_dim]``). The fan-in of every
    projection stays ``d_model`` (u-muP's scales do not change); the KV cache holds
    ``n_kv_heads`` heads.
    u-muP: projections are unit-scaled ``Linear`` layers; attention uses logits
    ``mult * q k^T / d_head`` and u-muP's output scale; SP: ``1/sqrt(d_head)``, plain maths.

    KV cache: pass ``cache={"k", "v"}`` (``[batch, cache_len, n_kv_heads, head_dim]``) and
    ``cache_index`` (first position of ``x``): the new keys and values are written at
    ``cache_index`` and queries attend causally to the cache. The scaling rule uses
    ``scale_seq_len`` (default ``cache_len``) and the causal flag, so a cached step gives the
    same values as a full forward pass over ``cache_len`` tokens. For cross attention, a
    ``cache`` holds the context's precomputed keys and values (``context_kv``).

    ``attention_kind="linear"``: kernelised linear attention (``Parametrization.
    linear_attention``: ``ops.linear_attention`` in u-muP) in place of softmax attention;
    masks are key padding masks only. Its cache (causal self attention) is the recurrent
    state ``{"kv": [batch, heads, head_dim, head_dim], "z": [batch, heads, head_dim]}``
    (``sum phi(k) v^T`` and ``sum phi(k)`` of the positions so far, float32), which each step
    adds its keys to: run each position once, in order. u-muP then needs ``scale_seq_len``.

    Sliding window (``window=W``, ``ops.patterns.window_keep``): the cache of a windowed
    layer is a ring buffer: position ``p`` lives in slot ``p mod cache_len``, so
    ``cache_len`` needs only ``min(W, total length)`` slots (a longer one works too); the
    scaling rule then needs ``scale_seq_len`` (the full length; u-muP only).

    Args:
      d_model: input width.
      n_heads: number of heads.
      rngs: ``nnx.Rngs``.
      n_kv_heads: number of key/value heads (a divisor of ``n_heads``; default ``n_heads``).
      d_head: head width (default ``d_model // n_heads``).
      cross: cross attention (q from ``x``, k and v from ``context``).
      causal: causal mask (self attention).
      d_context: width of the context (cross attention; default ``d_model``).
      bias: biases on the projections.
      use_rope: rotary position encoding on q and k (self attention).
      rope_theta: RoPE base.
      mult: u-muP's ``alpha_attn-softmax`` (muP: the logits multiplier).
      dropout: attention-probability dropout rate.
      attention_impl: the attention backend (``ops.plain.ATTENTION_IMPLEMENTATIONS``):
        ``"auto"`` (default), ``"xla"``, ``"cudnn"``, ``"chunked"`` or ``"pallas_tpu"``.
      block_q: query block size of the blockwise backends (``ops.plain.ATTENTION_BLOCK_Q``).
      block_kv: key block size of the blockwise backends (``ops.plain.ATTENTION_BLOCK_KV``).
      lora: LoRA adapters on the targeted projections (``nn.lora.LoRASpec``), or None.
      attention_kind: ``"softmax"`` (default) or ``"linear"`` (``ops.plain.ATTENTION_KINDS``).
      window: sliding-window width (self attention), or None for full attention.
      depth: residual-stack depth (parameter metadata).
      parametrization: ``"umup"``, ``"sp"`` or ``"mup"``.
      init_std: SP std of the input projections.
      out_init_std: SP std of the output projection.
      precision: low-precision policy, or None.
      layer: layer index for per-layer precision exceptions.
      dtype: compute dtype.
      param_dtype: storage dtype of the parameters.
    """

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs,
                 d_head: Optional[int] = None, cross: bool = False, causal: bool = False,
                 d_context: Optional[int] = None, bias: bool = False, use_rope: bool = False,
                 rope_theta: float = 10000.0, mult: float = 1.0, dropout: float = 0.0,
                 attention_impl: str = "auto", attention_kind: str = "softmax",
                 window: Optional[int] = None,
                 depth: Optional[int] = None,
                 parametrization: ParametrizationLike = "umup",
                 init_std: Optional[float] = None, out_init_std: Optional[float] = None,
                 precision: Any = None, layer: Optional[int] = None, dtype: Any = None,
                 param_dtype: Any = jnp.float32, n_kv_heads: Optional[int] = None,
                 block_q: int = plain.ATTENTION_BLOCK_Q,
                 block_kv: int = plain.ATTENTION_BLOCK_KV, lora: Any = None):
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(f"MultiHeadAttention: d_model {d_model} not divisible by n_heads "
                                 f"{n_heads}; pass d_head.")
            d_head = d_model // n_heads
        if use_rope and d_head % 2:
            raise ValueError(f"MultiHeadAttention: RoPE needs an even d_head, got {d_head}.")
        if cross and causal:
            raise ValueError("MultiHeadAttention: cross attention cannot be causal.")
        self.n_heads, self.d_head = int(n_heads), int(d_head)
        self.n_kv_heads = check_kv_heads(self.n_heads, n_kv_heads)
        plain.check_block_sizes(block_q, block_kv, attention_impl, op="MultiHeadAttention")
        self.block_q, self.block_kv = int(block_q), int(block_kv)
        self.cross, self.causal = bool(cross), bool(causal)
        self.use_rope, self.rope_theta = bool(use_rope), float(rope_theta)
        self.mult, self.dropout = float(mult), float(dropout)
        if attention_impl not in plain.ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"MultiHeadAttention: attention_impl must be one of "
                             f"{plain.ATTENTION_IMPLEMENTATIONS}, got {attention_impl!r}.")
        self.attention_impl = str(attention_impl)
        problem = linear_attention_problem(attention_kind, attention_impl, mult)
        if problem:
            raise ValueError(f"MultiHeadAttention: {problem}")
        self.attention_kind = str(attention_kind)
        self.window = patterns.check_window(window, "MultiHeadAttention")
        if cross and self.window is not None:
            raise ValueError("MultiHeadAttention: cross attention has no sliding window.")
        if self.window is not None and self.attention_kind == "linear":
            raise ValueError("MultiHeadAttention: linear attention has no sliding window.")
        self.parametrization = get_parametrization(parametrization)
        self.precision = precision
        self.layer = layer
        self.deterministic = False
        self.role = "cross_attn" if cross else "attn"
        inner = self.n_heads * self.d_head
        common = dict(rngs=rngs, bias=bias, depth=depth, parametrization=parametrization,
                      precision=precision, layer=layer, dtype=dtype, param_dtype=param_dtype,
                      lora=lora)
        if cross:
            self.q_proj = Linear(d_model, inner, init_std=init_std, sharding=("embed", "heads"),
                                 role="cross_attn.q_proj", **common)
            self.kv_proj = Linear(d_context or d_model, 2 * self.n_kv_heads * self.d_head,
                                  init_std=init_std,
                                  sharding=("embed", "heads"), role="cross_attn.kv_proj", **common)
        else:
            self.qkv_proj = Linear(d_model, inner + 2 * self.n_kv_heads * self.d_head,
                                   init_std=init_std,
                                   sharding=("embed", "heads"), role="attn.qkv_proj", **common)
        self.out_proj = Linear(inner, d_model, init_std=out_init_std, sharding=("heads", "embed"),
                               role=f"{self.role}.out_proj", **common)

    def _split(self, y: jax.Array, n: int):
        y = y.reshape(*y.shape[:-1], self.n_heads, n, self.d_head)
        return tuple(constrain(y[..., i, :], _QKV_NAMES) for i in range(n))

    def _split_qkv(self, y: jax.Array):
        """q ``[.., n_heads, d_head]``, k and v ``[.., n_kv_heads, d_head]`` of the fused
        projection (group-major: ``[n_kv_heads, group + 2, d_head]``)."""
        g = self.n_heads // self.n_kv_heads
        if g == 1:
            return self._split(y, 3)
        y = y.reshape(*y.shape[:-1], self.n_kv_heads, g + 2, self.d_head)
        q = y[..., :g, :].reshape(*y.shape[:-3], self.n_heads, self.d_head)
        return tuple(constrain(t, _QKV_NAMES) for t in (q, y[..., g, :], y[..., g + 1, :]))

    def _split_kv(self, y: jax.Array):
        """k and v ``[.., n_kv_heads, d_head]`` of a fused k/v projection."""
        y = y.reshape(*y.shape[:-1], self.n_kv_heads, 2, self.d_head)
        return tuple(constrain(y[..., i, :], _QKV_NAMES) for i in range(2))

    def context_kv(self, context: jax.Array, *, rng: Optional[jax.Array] = None) -> dict:
        """Keys and values of a cross-attention ``context`` (a reusable cache)."""
        if not self.cross:
            raise ValueError("context_kv is for cross attention.")
        k, v = self._split_kv(self.kv_proj(context, rng=rng))
        return {"k": k, "v": v}

    def _linear_attention(self, q, k, v, mask, cache, new_cache, scale_seq_len):
        """Linear attention; with a self-attention cache, one step of the recurrent state."""
        p = self.parametrization
        if cache is None or self.cross:  # a cross-attention cache holds the context's k, v
            return p.linear_attention(q, k, v, mask=mask, is_causal=self.causal,
                                      scale_seq_len=scale_seq_len), new_cache
        if not self.causal:
            raise ValueError("MultiHeadAttention: linear attention's cache is the causal "
                             "recurrent state; bidirectional self attention has no cache.")
        if set(cache) != {"kv", "z"}:
            raise ValueError(f"MultiHeadAttention: linear attention's cache is the state "
                             f"{{'kv', 'z'}}, got keys {sorted(cache)}.")
        state = jax.tree.map(lambda a: a.astype(jnp.float32), cache)
        return p.linear_attention(q, k, v, mask=mask, is_causal=True, state=state,
                                  scale_seq_len=scale_seq_len)

    def __call__(self, x: jax.Array, *, context: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None, rng: Optional[jax.Array] = None,
                 cache: Optional[dict] = None, cache_index: Any = None,
                 positions: Optional[jax.Array] = None, scale_seq_len: Optional[int] = None,
                 window: Any = _OWN_WINDOW):
        """Attends from ``x`` ``[batch, q_len, d]``.

        Args:
          x: queries' input.
          context: ``[batch, ctx_len, d_context]`` (cross attention, unless ``cache`` holds
            its keys and values).
          mask: boolean, broadcastable to ``[batch, heads, q_len, kv_len]``, True = attend.
          rng: PRNG key for attention dropout (and stochastic-rounding policies).
          cache: KV cache (see the class docstring).
          cache_index: position of ``x``'s first token in the cache (self attention).
          positions: RoPE positions ``[batch, q_len]`` (default ``cache_index + arange``).
          scale_seq_len: sequence length used by u-muP's attention scaling rule.
          window: this call's sliding window (an int, or None for full attention) instead of
            the module's (a scanned stack whose layers differ passes each layer's).

        Returns:
          ``[batch, q_len, d]``, or ``(output, new_cache)`` when ``cache`` is given.
        """
        q_len = x.shape[1]
        start = 0 if cache_index is None else cache_index
        window = self.window if window is _OWN_WINDOW else patterns.check_window(
            window, "MultiHeadAttention")
        scale_window = None
        keys = jax.random.split(rng, 6) if rng is not None else (None,) * 6
        is_causal, scale_causal = self.causal, None
        if self.cross:
            if cache is None and context is None:
                raise ValueError("cross attention needs a context (or a cache of its keys/values).")
            if cache is None and context.shape[0] != x.shape[0]:
                raise ValueError(f"cross attention: context batch {context.shape[0]} != query "
                                 f"batch {x.shape[0]}.")
            q, = self._split(self.q_proj(x, rng=keys[0]), 1)
            if cache is not None:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self._split_kv(self.kv_proj(context, rng=keys[1]))
            new_cache = cache
        else:
            q, k, v = self._split_qkv(self.qkv_proj(x, rng=keys[0]))
            if self.use_rope:
                if positions is None:
                    positions = (start + jnp.arange(q_len))[None, :]
                q = rope(q, positions, self.rope_theta)
                k = rope(k, positions, self.rope_theta)
            new_cache = cache
            if cache is not None and window is not None:
                k, v, mask, new_cache = self._ring_cache(cache, k, v, start, window, mask)
                is_causal, scale_causal, scale_window, window = False, True, window, None
                if scale_seq_len is None and self.parametrization.unit_scaled:
                    raise ValueError("MultiHeadAttention: a sliding-window KV cache needs "
                                     "scale_seq_len (the full sequence length) for u-muP's "
                                     "attention scale.")
            elif cache is not None and self.attention_kind != "linear":  # linear: a state
                k_all = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype),
                                                            start, axis=1)
                v_all = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype),
                                                            start, axis=1)
                new_cache = {"k": k_all, "v": v_all}
                k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
                q_pos = start + jnp.arange(q_len)
                keep = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]          # [q, kv]
                if not self.causal:
                    keep = jnp.arange(k.shape[1])[None, :] < (start + q_len)
                    keep = jnp.broadcast_to(keep, (q_len, k.shape[1]))
                keep = keep[None, None]
                mask = keep if mask is None else jnp.logical_and(mask, keep)
                is_causal, scale_causal = False, self.causal
                if scale_seq_len is None:
                    scale_seq_len = k.shape[1]
        q, k, v = (tap(f"{self.role}.{n}", t) for n, t in zip("qkv", (q, k, v)))
        q, k, v = hooks.attention_inputs(self.precision, q, k, v, layer=self.layer, rng=keys[2])
        rate = 0.0 if self.deterministic or self.attention_kind == "linear" else self.dropout
        if rate > 0.0 and rng is None:
            raise ValueError("attention dropout is on (dropout > 0, not deterministic): pass rng=, "
                             "or call model.eval() for deterministic evaluation.")
        if self.attention_kind == "linear":
            out, new_cache = self._linear_attention(q, k, v, mask, cache, new_cache,
                                                    scale_seq_len)
        else:
            out = self.parametrization.attention(
                q, k, v, mask=mask, is_causal=is_causal, mult=self.mult,
                dropout_rate=rate, rng=keys[3], scale_seq_len=scale_seq_len,
                scale_is_causal=scale_causal, implementation=self.attention_impl,
                block_q=self.block_q, block_kv=self.block_kv,
                # only windowed calls pass these (a user's Parametrization may predate them)
                **({} if window is None and scale_window is None
                   else dict(window=window, scale_window=scale_window)))
        out = hooks.attention_output(self.precision, out, layer=self.layer, rng=keys[4])
        out = tap(f"{self.role}.out", constrain(out, _QKV_NAMES))
        y = tap(f"{self.role}.proj", self.out_proj(out.reshape(*out.shape[:2], -1), rng=keys[5]))
        return y if cache is None else (y, new_cache)

    def _ring_cache(self, cache: dict, k, v, start, window: int, mask):
        """A sliding-window layer's cache step: keys and values to attend (the ring's
        ``C`` slots, then the ``q_len`` new ones), the mask of the window on their positions,
        and the ring with the new entries written (the last ``min(q_len, C)`` of them).

        Slot ``j`` holds the latest position below ``start`` that is ``j`` mod ``C``:
        ``start - 1 - ((start - 1 - j) mod C)`` (none yet if negative).
        """
        if not self.causal:
            raise ValueError("MultiHeadAttention: a sliding-window KV cache needs causal "
                             "attention.")
        if mask is not None:
            raise ValueError("MultiHeadAttention: a sliding-window KV cache takes no mask.")
        c_len, q_len = cache["k"].shape[1], k.shape[1]
        kc, vc = k.astype(cache["k"].dtype), v.astype(cache["v"].dtype)
        slot_pos = start - 1 - jnp.mod(start - 1 - jnp.arange(c_len), c_len)
        q_pos = start + jnp.arange(q_len)
        k_pos = jnp.concatenate([slot_pos, q_pos])
        seen = jnp.concatenate([slot_pos >= 0, jnp.ones(q_len, bool)])
        keep = seen[None, :] & patterns.window_keep(q_pos[:, None], k_pos[None, :], window, True)
        m = min(q_len, c_len)
        slots = jnp.mod(start + q_len - m + jnp.arange(m), c_len)
        new_cache = {"k": cache["k"].at[:, slots].set(kc[:, q_len - m:]),
                     "v": cache["v"].at[:, slots].set(vc[:, q_len - m:])}
        k_all = jnp.concatenate([cache["k"], kc], axis=1).astype(k.dtype)
        v_all = jnp.concatenate([cache["v"], vc], axis=1).astype(v.dtype)
        return k_all, v_all, keep[None, None], new_cache
