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

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from unitscale_jax.ops import _chunked, _linear, _pallas_tpu, _wide, patterns
from unitscale_jax.ops._checks import (
    check_ce_inputs,
    check_ids_in_range,
    check_kl_inputs,
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


ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "pallas_tpu")
"""The values of ``implementation`` of ``dot_product_attention`` (None means ``"auto"``)."""

PALLAS_TPU_BLOCK_Q_MULTIPLE = _pallas_tpu.BLOCK_Q_MULTIPLE
"""``"pallas_tpu"``'s ``block_q`` must be a multiple of this (TPU sublanes)."""
PALLAS_TPU_BLOCK_KV_MULTIPLE = _pallas_tpu.BLOCK_KV_MULTIPLE
"""``"pallas_tpu"``'s ``block_kv`` must be a multiple of this (the kernel's minimum block)."""
PALLAS_TPU_HEAD_DIM_TILE = _pallas_tpu.HEAD_DIM_TILE
"""``"pallas_tpu"`` needs ``head_dim`` below this or a multiple of it."""
pallas_tpu_interpret = _pallas_tpu.interpret

ATTENTION_BLOCK_Q = 512
"""Default query block size of the blockwise backends (``"chunked"``, ``"pallas_tpu"``)."""
ATTENTION_BLOCK_KV = 512
"""Default key block size of the blockwise backends (``"chunked"``, ``"pallas_tpu"``)."""


def check_block_sizes(block_q: Any, block_kv: Any, implementation: Optional[str] = None, *,
                      names: tuple[str, str] = ("block_q", "block_kv"),
                      op: str = "dot_product_attention") -> None:
    """Checks the block sizes of the blockwise attention backends.

    Every backend needs positive ints (the dense ones ignore them); ``"pallas_tpu"`` also
    needs ``block_q`` a multiple of ``PALLAS_TPU_BLOCK_Q_MULTIPLE`` (TPU sublanes) and
    ``block_kv`` a multiple of ``PALLAS_TPU_BLOCK_KV_MULTIPLE`` (TPU lanes; the kernel's
    minimum block), the limits of ``jax.experimental.pallas.ops.tpu.flash_attention``.

    Args:
      block_q: query block size.
      block_kv: key block size.
      implementation: the requested backend (None or ``"auto"``: only positivity).
      names: how the two are called in the error (e.g. the config's field names).
      op: who checks, for the error.

    Raises:
      ValueError: naming the size and its limit.
    """
    for name, size in zip(names, (block_q, block_kv)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{op}: {name} must be a positive int, got {size!r}.")
    if implementation == "pallas_tpu":
        for name, size, multiple in zip(names, (block_q, block_kv),
                                        (PALLAS_TPU_BLOCK_Q_MULTIPLE,
                                         PALLAS_TPU_BLOCK_KV_MULTIPLE)):
            if size % multiple:
                raise ValueError(f"{op}: implementation='pallas_tpu' needs {name} a multiple "
                                 f"of {multiple} (the TPU flash-attention kernel's tile), "
                                 f"got {size}.")

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
                          block_q: int = ATTENTION_BLOCK_Q,
                          block_kv: int = ATTENTION_BLOCK_KV,
                          window: Optional[int] = None, is_causal: bool = False) -> str:
    """The attention backend that ``dot_product_attention`` runs: ``"xla"``, ``"cudnn"``,
    ``"chunked"`` or ``"pallas_tpu"``.

    ``"auto"`` (or None): cuDNN on a GPU where dtype, head_dim and lengths allow it; the Pallas
    flash-attention kernel on a TPU where head_dim and block sizes allow it; otherwise
    ``"chunked"`` when ``kv_len > CHUNKED_MIN_KV_LEN`` and there is no dropout; otherwise
    ``"xla"``. A named backend is returned as it is, once its limits are checked.

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, kv_len, kv_heads, head_dim]``.
      implementation: one of ``ATTENTION_IMPLEMENTATIONS``, or None.
      mask: the attention mask (cuDNN needs even lengths with one).
      dropout_rate: attention dropout (only ``"xla"`` has it).
      block_q: query block size (``"pallas_tpu"``: a multiple of 8).
      block_kv: key block size (``"pallas_tpu"``: a multiple of 128).
      window: a sliding window (cuDNN has only the causal one).
      is_causal: whether the attention is causal.

    Raises:
      ValueError: an unknown name (listing the valid ones); ``"cudnn"`` or ``"pallas_tpu"``
        where it cannot run (naming the limit); ``"chunked"`` with dropout.
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
    if impl == "pallas_tpu":
        problem = _pallas_tpu.problem(q, k, rate, block_q, block_kv)
        if problem:
            raise ValueError(f"dot_product_attention: implementation='pallas_tpu' cannot run "
                             f"here: {problem}.")
    if impl == "chunked" and rate > 0.0:
        raise ValueError("dot_product_attention: implementation='chunked' has no attention "
                         "dropout; use 'xla' (or 'auto') with dropout_rate > 0.")
    if impl != "auto":
        return impl
    if _cudnn_problem(q, k, mask, rate, window, is_causal) is None:
        return "cudnn"
    if (jax.default_backend() == "tpu" and window is None  # (a window: chunked skips blocks)
            and _pallas_tpu.problem(q, k, rate, block_q, block_kv) is None):
        return "pallas_tpu"
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
    block_q: int = ATTENTION_BLOCK_Q,
    block_kv: int = ATTENTION_BLOCK_KV,
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
    - ``"pallas_tpu"``: the TPU flash-attention kernel of
      ``jax.experimental.pallas.ops.tpu`` (``unitscale_jax.ops._pallas_tpu``: GQA by
      repeating kv heads, odd lengths by padding, masks as segment ids or a bias); TPU only,
      or the Pallas TPU interpreter inside ``pallas_tpu_interpret()``; no dropout;
      head_dim below 128 or a multiple of 128.
    - ``"auto"`` or None: cuDNN where it can run, pallas_tpu on a TPU where it can run,
      chunked for keys longer than ``CHUNKED_MIN_KV_LEN``, else XLA.

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
      implementation: ``"auto"`` (None), ``"xla"``, ``"cudnn"``, ``"chunked"`` or
        ``"pallas_tpu"``.
      block_q: query block size of ``"chunked"`` (clipped to ``q_len``) and ``"pallas_tpu"``
        (a multiple of 8).
      block_kv: key block size of ``"chunked"`` (clipped to ``kv_len``) and ``"pallas_tpu"``
        (a multiple of 128).
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
    check_block_sizes(block_q, block_kv, implementation, op=op)
    impl = choose_implementation(q, k, implementation, mask=_any_mask(mask, static_mask),
                                 dropout_rate=rate, block_q=block_q, block_kv=block_kv,
                                 window=window, is_causal=is_causal)
    if impl == "pallas_tpu":
        dtype = q.dtype
        if dtype == jnp.float16 and jax.default_backend() == "cpu":  # interpreted on CPU
            q, k, v = (t.astype(F32) for t in (q, k, v))
        if window is not None or static_mask is not None:  # the kernel takes them as a mask
            extra = _pattern_mask(q, k, is_causal, window, static_mask)
            mask = extra if mask is None else jnp.logical_and(jnp.asarray(mask), extra)
        out = _pallas_tpu.flash_attention(
            q, k, v, logit_scale=float(logit_scale), mask=None if mask is None else
            jnp.asarray(mask), is_causal=is_causal, block_q=block_q, block_kv=block_kv)
        return out.astype(dtype)
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
        extra = _pattern_mask(q, k, is_causal, window, static_mask)
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


def _pattern_mask(q, k, is_causal, window, static_mask) -> jax.Array:
    """The window and static pattern as one boolean ``[1, 1, q_len, kv_len]`` mask."""
    return jnp.asarray(patterns.pattern_mask(q.shape[1], k.shape[1], is_causal=is_causal,
                                             window=window, static_mask=static_mask))[None, None]


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


def token_kl(logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """``KL(softmax(teacher_logits) || softmax(logits))`` per position, in float32.

    ``sum_v p_t (log p_t - log p_s)`` from log-softmaxes (stable for any logit range). The
    teacher is a fixed target: its logits get no gradient (``lax.stop_gradient``); the
    gradient to ``logits`` is ``softmax(logits) - softmax(teacher_logits)``.
    """
    log_p_t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(F32), axis=-1)
    log_p_s = jax.nn.log_softmax(logits.astype(F32), axis=-1)
    return jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)


def kl_divergence(logits: jax.Array, teacher_logits: jax.Array, *, temperature: float = 1.0,
                  where: Optional[jax.Array] = None) -> jax.Array:
    """Knowledge-distillation loss ``T^2 * KL(softmax(t / T) || softmax(s / T))``, averaged
    over the (``where``-selected) positions, ordinary gradient (Hinton et al., 2015).

    ``T^2`` keeps the gradient's size independent of ``T`` where the logits are small next to
    ``T`` (the gradient of the KL is ``(softmax(s/T) - softmax(t/T)) / T``). The teacher's
    logits get no gradient.

    Args:
      logits: the student's ``[..., V]``.
      teacher_logits: the teacher's ``[..., V]`` (as its own softmax reads them).
      temperature: ``T > 0``, a static Python number.
      where: optional boolean ``[...]``: the positions that count.

    Returns:
      A float32 scalar (0 where student and teacher agree).
    """
    where, t = check_kl_inputs(logits, teacher_logits, where, temperature, "kl_divergence")
    kl = token_kl(logits.astype(F32) / t, teacher_logits.astype(F32) / t)
    if where is None:
        return t * t * jnp.mean(kl)
    count = jnp.maximum(jnp.sum(where), 1).astype(F32)
    return t * t * jnp.sum(jnp.where(where, kl, 0.0)) / count


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


ATTENTION_KINDS = ("softmax", "linear")
"""The attention kinds of the models: ``dot_product_attention`` (softmax) or
``linear_attention`` (kernelised, ``phi(x) = elu(x) + 1``)."""

LINEAR_ATTENTION_CHUNK = 64
"""Positions per chunk of causal ``linear_attention`` (about ``head_dim``: the scan then keeps
``S D^2 / chunk ~ S D`` floats of state for the backward pass)."""


def linear_key_mask(mask, batch: int, kv_len: int, op: str) -> Optional[jax.Array]:
    """A key padding mask as ``[batch, kv_len]`` booleans (or None).

    Linear attention sums over keys once for all queries, so it takes a mask of keys only:
    ``[batch, kv_len]``, or any rank <= 4 mask whose query axis (and head axis) is 1, i.e.
    broadcastable from ``[batch, 1, 1, kv_len]``.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{op}: mask must be boolean (True = attend), got dtype {mask.dtype}.")
    if mask.ndim == 2:
        full = mask[:, None, None, :]
    elif mask.ndim <= 4:
        full = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    else:
        full = mask
    if full.ndim != 4 or full.shape[1] != 1 or full.shape[2] != 1:
        raise ValueError(f"{op}: linear attention takes a key padding mask only ([batch, kv_len] "
                         f"or [batch, 1, 1, kv_len]; it has no per-query weights), got shape "
                         f"{mask.shape}.")
    try:
        return jnp.broadcast_to(full[:, 0, 0, :], (batch, kv_len))
    except ValueError as e:
        raise ValueError(f"{op}: mask shape {mask.shape} does not broadcast to the key padding "
                         f"mask [{batch}, {kv_len}].") from e


def linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    is_causal: bool = False,
    mask: Optional[jax.Array] = None,
    state: Optional[dict] = None,
    chunk_size: int = LINEAR_ATTENTION_CHUNK,
):
    """Kernelised linear attention (Katharopoulos et al., 2020) with its ordinary gradient.

    ``o_t = sum_s (phi(q_t) . phi(k_s)) v_s / sum_s phi(q_t) . phi(k_s)`` with
    ``phi(x) = elu(x) + 1``, over the keys ``s`` query ``t`` sees (all unmasked keys; causal:
    ``s <= t``). Computed as ``phi(q_t)^T KV / phi(q_t)^T z`` from the running sums
    ``KV = sum phi(k_s) v_s^T`` and ``z = sum phi(k_s)`` (``unitscale_jax.ops._linear``):
    O(S) time and memory, no ``[q_len, kv_len]`` tensor; causal attention by prefix sums over
    chunks of ``chunk_size`` positions (any length: the last chunk is padded).

    Args:
      q: ``[batch, q_len, heads, head_dim]``.
      k: ``[batch, kv_len, kv_heads, head_dim]``; ``heads`` a multiple of ``kv_heads``.
      v: like ``k``.
      is_causal: query ``t`` sees keys ``s <= t`` (needs ``q_len == kv_len``).
      mask: optional key padding mask, ``[batch, kv_len]`` or ``[batch, 1, 1, kv_len]``
        (True = the key counts; see ``linear_key_mask``).
      state: causal decoding: the sums over the earlier positions, ``{"kv": [batch,
        kv_heads, head_dim, head_dim], "z": [batch, kv_heads, head_dim]}`` (zeros before the
        first token, ``linear_attention_state``); then ``(output, new_state)`` is returned.
      chunk_size: positions per chunk of the causal prefix sums.

    Returns:
      ``[batch, q_len, heads, head_dim]`` in q's dtype, or ``(output, new_state)`` when
      ``state`` is given.

    Raises:
      ValueError: bad shapes, a mask that is not a key padding mask, causal attention with
        ``q_len != kv_len``, a ``state`` without ``is_causal`` or of the wrong shape, a
        ``chunk_size`` that is not a positive int.
    """
    op = "linear_attention"
    check_attention_inputs(q, k, v, None, op)
    b, t, _, d = q.shape
    s_len, n_kv = k.shape[1], k.shape[2]
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}.")
    key_mask = linear_key_mask(mask, b, s_len, op)
    if state is not None:
        if not is_causal:
            raise ValueError(f"{op}: a state (cached decoding) continues causal attention; "
                             f"pass is_causal=True.")
        want = jax.tree.map(jnp.shape, linear_attention_state(b, n_kv, d))
        if not isinstance(state, dict) or jax.tree.map(jnp.shape, state) != want:
            got = (jax.tree.map(jnp.shape, state) if isinstance(state, dict)
                   else type(state).__name__)
            raise ValueError(f"{op}: state must be {want} (batch, kv_heads, head_dim), got "
                             f"{got}.")
    if not is_causal:
        return _linear.bidirectional(q, k, v, key_mask)
    if t != s_len:
        raise ValueError(f"{op}: causal linear attention needs q_len == kv_len (the same "
                         f"positions), got {t} and {s_len}; pass earlier positions as state.")
    out, new_state = _linear.causal(q, k, v, key_mask, state, chunk_size)
    return out if state is None else (out, new_state)


def linear_attention_state(batch: int, kv_heads: int, head_dim: int) -> dict:
    """The causal state of ``linear_attention`` before any token: float32 zeros
    ``{"kv": [batch, kv_heads, head_dim, head_dim], "z": [batch, kv_heads, head_dim]}``."""
    return _linear.empty_state(batch, kv_heads, head_dim)
