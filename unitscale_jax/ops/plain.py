"""The ordinary (not unit-scaled) maths that every unit-scaled op wraps.

Each function here is the plain op with its ordinary gradient: ``linear`` is
``mult * (x @ kernel + bias)``, ``dot_product_attention`` is ``softmax(logit_scale q k^T) v``,
``cross_entropy`` is the mean negative log-likelihood. The unit-scaled ops of
``unitscale_jax.ops`` are these cores with scales around them, and the standard and muP
parametrizations of ``unitscale_jax.nn`` use them as they are, so both run the same
computation (the same fast CPU backward for the linear layers, the same float32 token sums
for float16 parameters, the same attention fallbacks).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from unitscale_jax.ops import _chunked, _wide, patterns
from unitscale_jax.ops._checks import (
    check_ce_inputs,
    check_ids_in_range,
    check_linear_inputs,
    require_float,
    require_int,
    require_min_rank,
    require_range_rate,
    require_rank,
)

F32 = jnp.float32
DotGeneral = Callable[..., jax.Array]


def linear_dims(x: jax.Array) -> tuple:
    """``dimension_numbers`` of ``x[..., fan_in] @ kernel[fan_in, fan_out]`` for ``dot_general``."""
    return (((x.ndim - 1,), (0,)), ((), ()))


def linear(x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array] = None, *,
           mult: float = 1.0, dot_general: Optional[DotGeneral] = None) -> jax.Array:
    """``mult * (x @ kernel + bias)`` with its ordinary gradient (``kernel`` ``[fan_in, fan_out]``).

    Args:
      x: ``[..., fan_in]``.
      kernel: ``[fan_in, fan_out]``.
      bias: optional ``[fan_out]``.
      mult: a static output multiplier (muP's readout uses ``1/fan_in``).
      dot_general: optional ``jax.lax.dot_general``-compatible matmul (e.g. a precision
        policy's FP8 matmul), differentiated through; default the op's own fast form.

    Returns:
      ``[..., fan_out]``.
    """
    check_linear_inputs(x, kernel, bias, "linear")
    mult = float(mult)
    if dot_general is None:
        return _wide.scaled_affine(x, kernel, bias, mult, mult, mult)
    y = dot_general(x, kernel, linear_dims(x))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y if mult == 1.0 else y * jnp.asarray(mult, y.dtype)


def _gather(ids, table, check_ids: bool, table_grad_scale) -> jax.Array:
    """``table[ids]``; the table's gradient (row sums, in float32) times the scale
    (a float, or ``"unit"`` for unit scaling's ``sqrt(vocab / ids.size)``)."""
    require_int(ids, "ids", "embedding")
    require_float(table, "table", "embedding")
    require_rank(table, 2, "table", "embedding")
    vocab = table.shape[0]
    if check_ids:
        check_ids_in_range(ids, vocab, "token ids", "embedding")
    if table_grad_scale == "unit":
        table_grad_scale = (vocab / max(jnp.size(ids), 1)) ** 0.5
    return _wide.gather_rows(table, ids, table_grad_scale)


def embedding(ids: jax.Array, table: jax.Array, *, check_ids: bool = False) -> jax.Array:
    """``table[ids]`` (rows of a ``[vocab, d]`` table); the table's gradient sums in float32.

    Args:
      ids: integer ids of any shape.
      table: ``[vocab, d]``.
      check_ids: raise if an id lies outside ``[0, vocab)`` (JAX would clamp the gather).
    """
    return _gather(ids, table, check_ids, 1.0)


def gelu(x: jax.Array, *, mult: float = 1.0, approximate: bool = False) -> jax.Array:
    """``gelu(mult * x) / mult`` (exact GELU by default)."""
    if mult == 1.0:
        return jax.nn.gelu(x, approximate=approximate)
    return jax.nn.gelu(x * mult, approximate=approximate) / mult


def silu(x: jax.Array, *, mult: float = 1.0) -> jax.Array:
    """``x * sigmoid(mult * x)``."""
    return jax.nn.silu(x) if mult == 1.0 else x * jax.nn.sigmoid(x * mult)


def silu_glu(x: jax.Array, gate: jax.Array, *, mult: float = 1.0) -> jax.Array:
    """``x * gate * sigmoid(mult * gate)`` (SwiGLU's nonlinearity)."""
    return x * silu(gate, mult=mult)


def dropout(x: jax.Array, rate: float, *, rng: Optional[jax.Array] = None,
            deterministic: bool = False) -> jax.Array:
    """Inverted dropout: kept elements divided by ``1 - rate``; identity if deterministic."""
    rate = require_range_rate(rate, "dropout")
    if deterministic or rate == 0.0:
        return x
    if rng is None:
        raise ValueError("dropout: rng is required when rate > 0 and deterministic=False.")
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _attention_explicit(q, k, v, mask, is_causal, logit_scale, rate, rng):
    """Softmax attention written out: for dropout, and for float16 on CPU (whose dot has no
    float16 x float16 -> float32 form, which ``jax.nn.dot_product_attention`` needs)."""
    n_q, n_kv = q.shape[2], k.shape[2]
    if n_q != n_kv:
        k = jnp.repeat(k, n_q // n_kv, axis=2)
        v = jnp.repeat(v, n_q // n_kv, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(F32) * logit_scale
    t, s = logits.shape[-2:]
    keep = jnp.ones((t, s), bool)
    if is_causal:
        keep = jnp.tril(keep)
    if mask is not None:
        keep = jnp.logical_and(keep, mask)
    logits = jnp.where(keep, logits, jnp.finfo(F32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if rate > 0.0:
        drop_keep = jax.random.bernoulli(rng, 1.0 - rate, probs.shape)
        probs = jnp.where(drop_keep, probs / (1.0 - rate), 0.0)
    return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


def check_attention_inputs(q, k, v, mask, op: str) -> Optional[jax.Array]:
    """Validates ``[batch, seq, heads, head_dim]`` q, k, v; returns the mask broadcast to
    ``[batch, heads, q_len, kv_len]`` (or None)."""
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
        raise ValueError(f"{op}: q heads ({q.shape[2]}) must be a multiple of kv heads "
                         f"({k.shape[2]}).")
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{op}: mask must be boolean (True = attend), got dtype {mask.dtype}.")
    if mask.ndim > 4:
        raise ValueError(f"{op}: mask must have rank <= 4, got shape {mask.shape}.")
    target = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    try:
        return jnp.broadcast_to(mask.reshape((1,) * (4 - mask.ndim) + mask.shape), target)
    except ValueError as e:
        raise ValueError(f"{op}: mask shape {mask.shape} does not broadcast to {target}.") from e


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")
"""The values of ``implementation`` of ``dot_product_attention`` (None means ``"auto"``)."""

CHUNKED_MIN_KV_LEN = 2048
"""``"auto"`` runs ``"chunked"`` when the key length exceeds this (and cuDNN is not used): a
dense ``[q_len, kv_len]`` score matrix per head is then the largest tensor of a layer."""

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
CUDNN_MAX_HEAD_DIM = 128


def _cudnn_problem(q, k, mask, rate: float, window: Optional[int] = None,
                   is_causal: bool = False) -> Optional[str]:
    """Why cuDNN's fused attention cannot run these inputs, or None if it can."""
    if jax.default_backend() != "gpu":
        return f"it needs a GPU, the backend is {jax.default_backend()!r}"
    if q.dtype not in CUDNN_DTYPES:
        return f"it needs bfloat16 or float16 inputs, got {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > CUDNN_MAX_HEAD_DIM:
        return f"head_dim must be a multiple of 8 and at most {CUDNN_MAX_HEAD_DIM}, got {d}"
    t, s = q.shape[-3], k.shape[-3]
    if mask is not None and (t % 2 or s % 2):
        return f"with a mask q_len and kv_len must be even, got {t} and {s}"
    if rate > 0.0:
        return "it has no attention dropout"
    if window is not None and not is_causal:
        return "its sliding window is causal only (a bidirectional window needs 'xla' or 'chunked')"
    return None


def choose_implementation(q: jax.Array, k: jax.Array, implementation: Optional[str] = None, *,
                          mask: Optional[jax.Array] = None, dropout_rate: float = 0.0,
                          window: Optional[int] = None, is_causal: bool = False) -> str:
    """The attention backend that ``dot_product_attention`` runs: ``"xla"``, ``"cudnn"`` or
    ``"chunked"``.

    ``"auto"`` (or None): cuDNN on a GPU where dtype, head_dim and lengths allow it; otherwise
    ``"chunked"`` when ``kv_len > CHUNKED_MIN_KV_LEN`` and there is no dropout; otherwise
    ``"xla"``. A named backend is returned as it is, once its limits are checked.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, kv_len, kv_heads, head_dim]``.
      implementation: one of ``ATTENTION_IMPLEMENTATIONS``, or None.
      mask: the attention mask (cuDNN needs even lengths with one).
      dropout_rate: attention dropout (only ``"xla"`` has it).
      window: a sliding window (cuDNN has only the causal one).
      is_causal: whether the attention is causal.

    Raises:
      ValueError: an unknown name (listing the valid ones); ``"cudnn"`` where cuDNN cannot run
        (naming the limit); ``"chunked"`` with dropout.
    """
    impl = "auto" if implementation is None else implementation
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"dot_product_attention: implementation must be one of "
                         f"{ATTENTION_IMPLEMENTATIONS} or None, got {implementation!r}.")
    rate = float(dropout_rate)
    if impl == "cudnn":
        problem = _cudnn_problem(q, k, mask, rate, window, is_causal)
        if problem:
            raise ValueError(f"dot_product_attention: implementation='cudnn' cannot run here: "
                             f"{problem}.")
    if impl == "chunked" and rate > 0.0:
        raise ValueError("dot_product_attention: implementation='chunked' has no attention "
                         "dropout; use 'xla' (or 'auto') with dropout_rate > 0.")
    if impl != "auto":
        return impl
    if _cudnn_problem(q, k, mask, rate, window, is_causal) is None:
        return "cudnn"
    if k.shape[-3] > CHUNKED_MIN_KV_LEN and rate == 0.0:
        return "chunked"
    return "xla"


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    logit_scale: float,
    mask: Optional[jax.Array] = None,
    is_causal: bool = False,
    dropout_rate: float = 0.0,
    rng: Optional[jax.Array] = None,
    implementation: Optional[str] = None,
    block_q: int = 512,
    block_kv: int = 512,
    window: Optional[int] = None,
    static_mask: Optional[np.ndarray] = None,
) -> jax.Array:
    """``softmax(logit_scale * q k^T) v`` per head, with its ordinary gradient.

    Backends (``implementation``, see ``choose_implementation``):

    - ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")``, the dense scores; with
      dropout (which that function lacks), or float16 on CPU, an explicit softmax path.
    - ``"cudnn"``: ``jax.nn.dot_product_attention(implementation="cudnn")`` (GPU, bfloat16 or
      float16, head_dim a multiple of 8 and at most 128).
    - ``"chunked"``: memory-efficient blockwise attention in pure JAX (online softmax, a
      backward that recomputes the block scores; ``unitscale_jax.ops._chunked``): memory
      linear in the sequence length; no dropout.
    - ``"auto"`` or None: cuDNN where it can run, chunked for keys longer than
      ``CHUNKED_MIN_KV_LEN``, else XLA.

    A query row that sees no key at all (a mask that hides every key from it) gives zeros
    under ``"chunked"`` and the mean of all values under ``"xla"``; neither gives NaN.

    Args:
      q: ``[batch, q_len, heads, head_dim]`` (or all of q, k, v without the batch axis).
      k: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` a multiple of ``kv_heads``.
      v: like ``k``.
      logit_scale: static multiplier of the logits (SP: ``1/sqrt(head_dim)``).
      mask: optional boolean mask broadcastable to ``[batch, heads, q_len, kv_len]``, True
        where attention is allowed; combined with ``is_causal``.
      is_causal: apply a causal mask (query ``t`` sees keys ``s <= t``).
      dropout_rate: attention-probability dropout.
      rng: PRNG key for dropout.
      implementation: ``"auto"`` (None), ``"xla"``, ``"cudnn"`` or ``"chunked"``.
      block_q: query block size of ``"chunked"`` (clipped to ``q_len``).
      block_kv: key block size of ``"chunked"`` (clipped to ``kv_len``).
      window: sliding-window (local) attention of width ``W``
        (``ops.patterns.window_keep``): query ``t`` sees keys ``t - W + 1 .. t`` (causal)
        or ``t - W .. t + W`` (bidirectional); combined with ``mask``. XLA applies it as a
        mask, cuDNN as its (causal-only) sliding window, and ``"chunked"`` skips the key
        blocks outside it, forward and backward, so its cost is ``O(q_len * W)``.
      static_mask: a static (numpy) boolean ``[q_len, kv_len]`` mask, e.g.
        ``ops.patterns.block_sparse_mask``, combined with ``mask``; ``"chunked"`` skips the
        blocks it leaves empty.

    Returns:
      ``[batch, q_len, heads, head_dim]``.

    Raises:
      ValueError: bad shapes, an unknown ``implementation``, a backend that cannot run these
        inputs (see ``choose_implementation``), a window below 1, a traced or misshapen
        ``static_mask``.
    """
    op = "dot_product_attention"
    if q.ndim == 3 and k.ndim == 3 and v.ndim == 3:  # unbatched [seq, heads, head_dim] (vmap)
        return dot_product_attention(
            q[None], k[None], v[None], logit_scale=logit_scale, mask=mask, is_causal=is_causal,
            dropout_rate=dropout_rate, rng=rng, implementation=implementation,
            block_q=block_q, block_kv=block_kv, window=window, static_mask=static_mask)[0]
    window = patterns.check_window(window, op)
    full_mask = check_attention_inputs(q, k, v, mask, op)
    static_mask = patterns.check_static_mask(static_mask, q.shape[1], k.shape[1], op)
    rate = require_range_rate(dropout_rate, op)
    if rate > 0.0 and rng is None:
        raise ValueError(f"{op}: rng is required when dropout_rate > 0.")
    for name, size in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {size!r}.")
    impl = choose_implementation(q, k, implementation, mask=_any_mask(mask, static_mask),
                                 dropout_rate=rate, window=window, is_causal=is_causal)
    if impl == "chunked":
        dtype = q.dtype
        if dtype == jnp.float16 and jax.default_backend() == "cpu":  # no f16 x f16 -> f32 dot
            q, k, v = (t.astype(F32) for t in (q, k, v))
        out = _chunked.chunked_attention(
            q, k, v, logit_scale=float(logit_scale), mask=None if mask is None else
            jnp.asarray(mask), is_causal=is_causal, block_q=block_q, block_kv=block_kv,
            window=window, static_mask=static_mask)
        return out.astype(dtype)
    if static_mask is not None or (window is not None and impl != "cudnn"):
        extra = patterns.pattern_mask(q.shape[1], k.shape[1], is_causal=is_causal,
                                      window=window, static_mask=static_mask)
        extra = jnp.asarray(extra)[None, None]
        full_mask = jnp.broadcast_to(extra, (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
                                     ) if full_mask is None else jnp.logical_and(full_mask, extra)
        window = None
    if impl == "xla" and (rate > 0.0 or (q.dtype == jnp.float16
                                         and jax.default_backend() == "cpu")):
        return _attention_explicit(q, k, v, full_mask, is_causal, float(logit_scale), rate, rng)
    local = None if window is None else (window - 1, 0)   # cudnn: causal windows only
    return jax.nn.dot_product_attention(q, k, v, mask=full_mask, scale=float(logit_scale),
                                        is_causal=is_causal, implementation=impl,
                                        local_window_size=local)


def _any_mask(mask, static_mask):
    """A stand-in for "there is a mask" (``choose_implementation`` only asks whether)."""
    return mask if mask is not None else static_mask


def token_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``logsumexp(x) - x[label]`` per position, in float32 (never materialises log-probs)."""
    x = logits.astype(F32)
    label_logit = jnp.take_along_axis(x, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jax.nn.logsumexp(x, axis=-1) - label_logit


def cross_entropy(logits: jax.Array, labels: jax.Array, *, where: Optional[jax.Array] = None,
                  check_ids: bool = False) -> jax.Array:
    """Mean softmax cross-entropy over the (``where``-selected) positions, ordinary gradient.

    Args:
      logits: ``[..., V]``.
      labels: integer ``[...]``.
      where: optional boolean ``[...]``: the positions that count.
      check_ids: raise if a (counted) label is outside ``[0, V)``.

    Returns:
      A float32 scalar.
    """
    where = check_ce_inputs(logits, labels, where, check_ids, "cross_entropy")
    nll = token_nll(logits, labels)
    if where is None:
        return jnp.mean(nll)
    count = jnp.maximum(jnp.sum(where), 1).astype(F32)
    return jnp.sum(jnp.where(where, nll, 0.0)) / count


def _check_param(p, d: int, name: str, op: str) -> None:
    if p is not None:
        require_float(p, name, op)
        if p.shape != (d,):
            raise ValueError(f"{op}: {name} must have shape ({d},) to match x's last axis, "
                             f"got {p.shape}.")


def _layer_norm(x, scale, bias, eps: float, param_grad_scale: float) -> jax.Array:
    """Layer norm whose gain and bias gradients (token sums, in float32) are scaled."""
    require_float(x, "x", "layer_norm")
    require_min_rank(x, 1, "x", "layer_norm")
    d = x.shape[-1]
    _check_param(scale, d, "scale", "layer_norm")
    _check_param(bias, d, "bias", "layer_norm")
    x32 = x.astype(F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    if scale is not None:
        y = _wide.mul_param(y, scale, param_grad_scale)
    if bias is not None:
        y = _wide.add_param(y, bias, param_grad_scale)
    return y


def _rms_norm(x, scale, eps: float, param_grad_scale: float) -> jax.Array:
    """RMS norm whose gain gradient (a token sum, in float32) is scaled."""
    require_float(x, "x", "rms_norm")
    require_min_rank(x, 1, "x", "rms_norm")
    d = x.shape[-1]
    _check_param(scale, d, "scale", "rms_norm")
    ms = jnp.mean(jnp.square(x.astype(F32)), axis=-1, keepdims=True)
    y = x / jnp.sqrt(ms + eps).astype(x.dtype)
    return y if scale is None else _wide.mul_param(y, scale, param_grad_scale)


def layer_norm(x: jax.Array, scale: Optional[jax.Array] = None,
               bias: Optional[jax.Array] = None, *, eps: float = 1e-5) -> jax.Array:
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last axis (statistics in
    float32)."""
    return _layer_norm(x, scale, bias, eps, 1.0)


def rms_norm(x: jax.Array, scale: Optional[jax.Array] = None, *, eps: float = 1e-5) -> jax.Array:
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis (the RMS in float32)."""
    return _rms_norm(x, scale, eps, 1.0)
