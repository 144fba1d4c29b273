"""The attention backends of ``ops.plain.dot_product_attention``: the chunked (memory-efficient)
one gives XLA's values and q, k, v gradients, ``"auto"`` picks what it says, the chunked
backward holds no ``[q_len, kv_len]`` tensor, and bad requests fail clearly."""

import chex
import jax
import jax.numpy as jnp
import pytest

from unitscale_jax import ops
from unitscale_jax.ops import plain

ON_CPU = jax.default_backend() == "cpu"


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape).astype(dtype)


def _qkv(t, s, heads=4, kv_heads=2, d=8, batch=2, dtype=jnp.float32):
    return (_rand(0, (batch, t, heads, d), dtype), _rand(1, (batch, s, kv_heads, d), dtype),
            _rand(2, (batch, s, kv_heads, d), dtype))


def _vjp(f, q, k, v):
    """The output and the q, k, v gradients for a fixed random output cotangent."""
    y, pullback = jax.vjp(f, q, k, v)
    return y, pullback(_rand(99, y.shape, y.dtype))


def _padding_mask(batch, t, s, kind):
    """A key-padding mask ``[b, 1, 1, s]`` or a per-query ``[b, 1, t, s]`` one (row 0 keeps all)."""
    lengths = jnp.array([s, s - 7])[:batch]
    keys = jnp.arange(s)[None, None, None, :] < lengths[:, None, None, None]
    if kind == "keys":
        return keys
    rows = (jnp.arange(t)[:, None] + jnp.arange(s)[None, :]) % 5 != 1    # arbitrary holes
    return jnp.logical_and(keys, rows.at[:, 0].set(True)[None, None])


def _attn(impl, **kw):
    return lambda q, k, v: plain.dot_product_attention(q, k, v, implementation=impl, **kw)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "keys", "rows"])
@pytest.mark.parametrize("t, s, heads, kv_heads", [(37, 53, 4, 2), (53, 37, 4, 4),
                                                   (32, 32, 4, 1)])
def test_chunked_matches_xla_values_and_gradients(causal, mask_kind, t, s, heads, kv_heads):
    q, k, v = _qkv(t, s, heads, kv_heads)
    mask = None if mask_kind is None else _padding_mask(2, t, s, mask_kind)
    kw = dict(logit_scale=0.3, mask=mask, is_causal=causal)
    chex.assert_trees_all_close(
        _vjp(_attn("chunked", block_q=16, block_kv=16, **kw), q, k, v),
        _vjp(_attn("xla", **kw), q, k, v), rtol=1e-5, atol=2e-6)


def test_chunked_default_blocks_and_single_query_decode():
    """Default (clipped) blocks, and q_len = 1 against a long cache with an explicit mask, as
    the KV-cache decode path calls it."""
    q, k, v = _qkv(1, 700, heads=4, kv_heads=2, batch=2)
    keep = (jnp.arange(700) <= 411)[None, None, None, :]
    kw = dict(logit_scale=0.125, mask=keep)
    chex.assert_trees_all_close(_vjp(_attn("chunked", **kw), q, k, v),
                                _vjp(_attn("xla", **kw), q, k, v), rtol=1e-5, atol=2e-6)
    q, k, v = _qkv(530, 530, heads=2, kv_heads=1, batch=1)
    chex.assert_trees_all_close(
        _vjp(_attn("chunked", logit_scale=0.2, is_causal=True), q, k, v),
        _vjp(_attn("xla", logit_scale=0.2, is_causal=True), q, k, v), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("dtype, atol", [(jnp.bfloat16, 3e-2), (jnp.float16, 4e-3)])
def test_chunked_low_precision(dtype, atol):
    """bfloat16 / float16 inputs (accumulated in float32) within the format's rounding of the
    float32 result; the output keeps the input dtype."""
    q, k, v = _qkv(37, 53, dtype=dtype)
    kw = dict(logit_scale=0.3, is_causal=True)
    low = _vjp(_attn("chunked", block_q=16, block_kv=16, **kw), q, k, v)
    ref = _vjp(_attn("xla", **kw), *(t.astype(jnp.float32) for t in (q, k, v)))
    assert low[0].dtype == dtype and all(g.dtype == dtype for g in low[1])
    chex.assert_trees_all_close(jax.tree.map(lambda a: a.astype(jnp.float32), low), ref,
                                atol=atol, rtol=atol)


def test_rows_that_see_no_key_are_zero_not_nan():
    q, k, v = _qkv(20, 24, batch=1)
    mask = jnp.ones((1, 1, 20, 24), bool).at[:, :, 3].set(False)    # query 3 sees nothing
    y, (dq, dk, dv) = _vjp(_attn("chunked", logit_scale=0.3, mask=mask, block_q=8, block_kv=8),
                           q, k, v)
    assert all(bool(jnp.isfinite(a).all()) for a in (y, dq, dk, dv))
    assert float(jnp.abs(y[:, 3]).max()) == 0.0 and float(jnp.abs(dq[:, 3]).max()) == 0.0
    rows = jnp.arange(20) != 3
    y_ref, (dq_ref, _, _) = _vjp(_attn("xla", logit_scale=0.3, mask=mask), q, k, v)
    chex.assert_trees_all_close((y[:, rows], dq[:, rows]), (y_ref[:, rows], dq_ref[:, rows]),
                                rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_scaled_attention_same_rule_on_every_backend(causal):
    """``ops.scaled_dot_product_attention``: the unit-scaling rule (``s`` on the output and
    on q, k, v's gradients) is the same with the chunked backend, batched or not."""
    q, k, v = _qkv(37, 53)
    mask = _padding_mask(2, 37, 53, "keys")

    def sdpa(impl, **kw):
        return lambda q, k, v: ops.scaled_dot_product_attention(
            q, k, v, mask=mask, is_causal=causal, mult=2.0, implementation=impl, **kw)

    chunked = _vjp(sdpa("chunked", block_q=16, block_kv=16), q, k, v)
    chex.assert_trees_all_close(chunked, _vjp(sdpa("xla"), q, k, v), rtol=1e-5, atol=2e-6)
    s = ops.attention_scale(53, 8, mult=2.0, is_causal=causal)
    plain_out = _attn("chunked", logit_scale=2.0 / 8, mask=mask, is_causal=causal)(q, k, v)
    chex.assert_trees_all_close(chunked[0], s * plain_out, rtol=1e-5, atol=1e-6)
    unbatched = ops.scaled_dot_product_attention(q[0], k[0], v[0], is_causal=causal,
                                                 implementation="chunked", block_q=16)
    batched = ops.scaled_dot_product_attention(q, k, v, is_causal=causal, implementation="xla")
    chex.assert_trees_all_close(unbatched, batched[0], rtol=1e-5, atol=2e-6)


@pytest.mark.skipif(not ON_CPU, reason="the auto choice on CPU")
def test_auto_choice_on_cpu():
    limit = plain.CHUNKED_MIN_KV_LEN
    q = jnp.zeros((1, 8, 2, 16))
    short, long = jnp.zeros((1, limit, 2, 16)), jnp.zeros((1, limit + 1, 2, 16))
    assert plain.choose_implementation(q, short, "auto") == "xla"
    assert plain.choose_implementation(q, long, "auto") == "chunked"
    assert plain.choose_implementation(q, long, None) == "chunked"
    assert plain.choose_implementation(q, long, "auto", dropout_rate=0.1) == "xla"
    assert plain.choose_implementation(q, long.astype(jnp.bfloat16), "xla") == "xla"
    assert plain.choose_implementation(q, short, "chunked") == "chunked"


@pytest.mark.skipif(not ON_CPU, reason="XLA:CPU's memory analysis")
def test_chunked_backward_holds_no_score_matrix():
    """Forward + backward at T = S = 4096: the chunked path's temporaries are far below one
    float32 ``[B, H, T, S]`` score tensor; the dense path's are not (so the check can fail)."""
    b, t, h, d = 1, 4096, 2, 32
    q = jax.ShapeDtypeStruct((b, t, h, d), jnp.float32)
    scores_bytes = b * h * t * t * 4

    def temp_bytes(impl, **kw):
        def loss(q, k, v):
            return plain.dot_product_attention(q, k, v, logit_scale=0.1, is_causal=True,
                                               implementation=impl, **kw).sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, q, q).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    chunked = temp_bytes("chunked", block_q=256, block_kv=256)   # measured: ~7 MB of 134 MB
    assert chunked < scores_bytes / 8, (chunked, scores_bytes)
    assert temp_bytes("xla") >= scores_bytes, scores_bytes            # measured: ~400 MB


def test_bad_requests_fail_clearly():
    q, k, v = _qkv(8, 8)
    with pytest.raises(ValueError, match=r"implementation must be one of \('auto', 'xla', "
                                         r"'cudnn', 'chunked', 'pallas_tpu'\)"):
        plain.dot_product_attention(q, k, v, logit_scale=1.0, implementation="flash")
    with pytest.raises(ValueError, match="'chunked' has no attention dropout"):
        plain.dot_product_attention(q, k, v, logit_scale=1.0, implementation="chunked",
                                    dropout_rate=0.1, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="block_kv must be a positive int"):
        plain.dot_product_attention(q, k, v, logit_scale=1.0, implementation="chunked",
                                    block_kv=0)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' cannot run here: it needs a GPU"):
            ops.scaled_dot_product_attention(q, k, v, implementation="cudnn")
    else:
        with pytest.raises(ValueError, match="'cudnn' cannot run here: it needs bfloat16"):
            ops.scaled_dot_product_attention(q, k, v, implementation="cudnn")
        q16, k16, v16 = _qkv(8, 8, d=12, dtype=jnp.bfloat16)
        with pytest.raises(ValueError, match="head_dim must be a multiple of 8"):
            plain.dot_product_attention(q16, k16, v16, logit_scale=1.0, implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
def test_cudnn_matches_chunked_on_gpu():
    q, k, v = _qkv(64, 128, heads=4, kv_heads=2, d=64, dtype=jnp.bfloat16)
    kw = dict(logit_scale=0.125, is_causal=True)
    assert plain.choose_implementation(q, k, "auto") == "cudnn"
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a.astype(jnp.float32), _vjp(_attn("cudnn", **kw), q, k, v)),
        jax.tree.map(lambda a: a.astype(jnp.float32), _vjp(_attn("chunked", block_q=32,
                                                                 block_kv=32, **kw), q, k, v)),
        atol=3e-2, rtol=3e-2)
