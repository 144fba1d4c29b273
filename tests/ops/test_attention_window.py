"""Sliding-window and block-sparse attention (``window=``, ``static_mask=``): every backend
against a dense reference with an explicit boolean mask (values and q, k, v gradients), the
chunked backend skips the blocks outside the pattern, the unit scale's closed forms equal
the visible-key counts and give unit outputs at init for every window, and bad input fails
clearly."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax import ops
from unitscale_jax.ops import patterns, plain
from unitscale_jax.ops.attention import flat_output_variance


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


def _qkv(t, heads=4, kv_heads=2, d=8, batch=2):
    return (_rand(0, (batch, t, heads, d)), _rand(1, (batch, t, kv_heads, d)),
            _rand(2, (batch, t, kv_heads, d)))


def _explicit_keep(t_len, window, causal):
    """The window written out query by query (not ``patterns.window_keep``)."""
    keep = np.zeros((t_len, t_len), bool)
    for t in range(t_len):
        if window is None:
            lo, hi = (0, t) if causal else (0, t_len - 1)
        else:
            lo, hi = (t - window + 1, t) if causal else (t - window, t + window)
        keep[t, max(lo, 0):min(hi, t_len - 1) + 1] = True
    return keep


def _dense_reference(q, k, v, keep_bhts, scale):
    """softmax with an explicit boolean mask; a row that sees nothing gives zeros."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    logits = jnp.where(keep_bhts, logits, -jnp.inf)
    m = jnp.max(jnp.where(keep_bhts, logits, -1e30), axis=-1, keepdims=True)
    p = jnp.where(keep_bhts, jnp.exp(logits - m), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bnts,bsnh->btnh", p, v)


T = 37   # not a multiple of the block size 8
PATTERNS = {
    "window1": dict(window=1),
    "window5": dict(window=5),
    "sparse": dict(sparse=True),
}


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_patterns_match_dense_reference_values_and_gradients(causal, pattern):
    """xla and chunked (blocks of 8 that do not divide 37), GQA (4 q heads on 2 kv heads),
    a padding mask (row 1's last 6 keys hidden; row 0 unpadded). A window that covers the
    whole length, and no mask, are in ``test_window_at_least_the_length_is_full_attention``."""
    spec = PATTERNS[pattern]
    q, k, v = _qkv(T)
    window = spec.get("window")
    if spec.get("sparse"):
        # blocks must divide the length for the mask: 36 tokens of blocks of 4, one padded
        q, k, v = (a[:, :36] for a in (q, k, v))
        static = ops.block_sparse_mask(36, 4, 2, 3, causal=causal)
        t_len, keep = 36, static & _explicit_keep(36, None, causal)
    else:
        static, t_len, keep = None, T, _explicit_keep(T, window, causal)
    lengths = np.array([t_len, t_len - 6])
    pad = np.arange(t_len)[None, :] < lengths[:, None]                        # [b, s]
    for mask in (jnp.asarray(pad)[:, None, None, :],):
        full = keep[None, None] & pad[:, None, None, :]
        rows = full.any(-1)                                                   # [b, 1, t]
        g = _rand(9, q.shape) * jnp.moveaxis(jnp.asarray(rows), 1, 2)[..., None]

        def ref(q, k, v):
            return _dense_reference(q, k, v, jnp.asarray(full), 0.3)
        want = jax.vjp(ref, q, k, v)
        want = (want[0] * jnp.moveaxis(jnp.asarray(rows), 1, 2)[..., None], want[1](g))
        for impl in ("xla", "chunked"):
            def f(q, k, v, impl=impl):
                return plain.dot_product_attention(
                    q, k, v, logit_scale=0.3, mask=mask, is_causal=causal, window=window,
                    static_mask=static, implementation=impl, block_q=8, block_kv=8)
            y, pull = jax.vjp(f, q, k, v)
            got = (y * jnp.moveaxis(jnp.asarray(rows), 1, 2)[..., None], pull(g))
            chex.assert_trees_all_close(got, want, rtol=1e-5, atol=2e-6)


def test_window_at_least_the_length_is_full_attention():
    q, k, v = _qkv(20, batch=1)
    for causal in (True, False):
        full = plain.dot_product_attention(q, k, v, logit_scale=0.3, is_causal=causal)
        wide = plain.dot_product_attention(q, k, v, logit_scale=0.3, is_causal=causal,
                                           window=20, implementation="chunked", block_q=8)
        chex.assert_trees_all_close(wide, full, rtol=1e-5, atol=2e-6)
        assert ops.attention_scale(20, 8, is_causal=causal, window=20) == ops.attention_scale(
            20, 8, is_causal=causal)


def test_chunked_visits_only_the_blocks_of_the_window():
    """The schedule: a causal window of one block visits the diagonal block and the one
    before it (31 of the 136 blocks a causal pass visits at S = 16 blocks); bidirectional
    three per row. The kernel keeps to it, forward and backward: NaN keys and values in the
    first block do not reach queries whose window ends after it (a dense pass, or a visit
    of that block, would spread them: 0 * NaN = NaN)."""
    occ = patterns.block_occupancy(4096, 4096, 256, 256, is_causal=True, window=256)
    assert occ.sum() == 31
    assert patterns.block_occupancy(4096, 4096, 256, 256, is_causal=True).sum() == 136
    assert patterns.block_occupancy(4096, 4096, 256, 256, window=200).sum() == 16 * 3 - 2
    sparse = ops.block_sparse_mask(4096, 256, 1, 0, causal=True)
    assert patterns.block_occupancy(4096, 4096, 256, 256, static_mask=sparse).sum() == 16

    q, k, v = _qkv(64, batch=1)
    k, v = k.at[:, :8].set(jnp.nan), v.at[:, :8].set(jnp.nan)   # key block 0 (of 8)

    def loss(impl, **kw):
        def f(q, k, v):
            y = plain.dot_product_attention(q, k, v, logit_scale=0.3, is_causal=True,
                                            implementation=impl, block_q=8, block_kv=8, **kw)
            return jnp.sum(y[:, 16:] ** 2)          # queries 16.. (their windows skip 0..7)
        return jax.value_and_grad(f)(q, k, v)

    y, dq = loss("chunked", window=8)
    assert math.isfinite(float(y)) and bool(jnp.isfinite(dq[:, 16:]).all())
    y, dq = loss("chunked", static_mask=np.asarray(_explicit_keep(64, 8, True)))
    assert math.isfinite(float(y)) and bool(jnp.isfinite(dq[:, 16:]).all())
    y, dq = loss("xla", window=8)                    # the dense pass reads every key
    assert not math.isfinite(float(y))


def test_flat_output_variance_closed_forms_equal_the_counts():
    """``mean_t 1/n_t`` from the closed forms against the counts of the explicit window (and
    ``ops.patterns.visible_counts``), every window of several lengths; the full causal case
    is the reference's ``ln S / S``."""
    for s_len in (1, 2, 3, 7, 16, 33, 100):
        for causal in (True, False):
            for w in range(1, s_len + 2):
                counts = _explicit_keep(s_len, w, causal).sum(-1)
                np.testing.assert_array_equal(
                    counts, patterns.visible_counts(s_len, s_len, is_causal=causal, window=w))
                got = flat_output_variance(s_len, is_causal=causal, window=w)
                if causal and w >= s_len:
                    assert got == math.log(s_len) / s_len
                    continue
                assert got == pytest.approx(np.mean(1.0 / counts), rel=1e-12), (s_len, w)
                assert ops.attention_scale(s_len, 16, window=w, is_causal=causal) == \
                    pytest.approx(ops.attention_scale_from_counts(counts, 16), rel=1e-12)
    counts = _explicit_keep(5000, 300, False).sum(-1)     # the asymptotic harmonic numbers
    assert flat_output_variance(5000, window=300) == pytest.approx(np.mean(1 / counts), 1e-12)
    counts = np.minimum(np.arange(1, 5001), 700)
    assert flat_output_variance(5000, is_causal=True, window=700) == pytest.approx(
        np.mean(1 / counts), rel=1e-12)


def test_unit_scale_at_init_for_every_window():
    """u-muP's scaled op on unit-normal q, k, v: the output std and the v gradient's are
    within 10% of 1 for every window W = 1 .. S, causal and bidirectional; the q and k
    gradients within 10% of flat attention's prediction ``s^2 mean_t (1/n_t - 1/n_t^2) /
    d_head`` (zero at W = 1: one key, no softmax gradient). Also a block-sparse mask."""
    s_len, d = 64, 64
    q, k, v = (_rand(i, (4, s_len, 4, d)) for i in range(3))
    g = _rand(7, q.shape)

    def check(kw, counts, s, label):
        def f(q, k, v):
            return ops.scaled_dot_product_attention(q, k, v, implementation="xla", **kw)
        y, pull = jax.vjp(f, q, k, v)
        dq, dk, dv = pull(g)
        assert abs(float(jnp.std(y)) - 1) < 0.1, (label, float(jnp.std(y)))
        assert abs(float(jnp.std(dv)) - 1) < 0.1, (label, float(jnp.std(dv)))
        pred = (s**2 * np.mean(1 / counts - 1 / counts**2) / d) ** 0.5
        for name, grad in (("q", dq), ("k", dk)):
            got = float(jnp.std(grad))
            assert abs(got - pred) <= 0.1 * pred + 1e-6, (label, name, got, pred)

    for causal in (True, False):
        for w in range(1, s_len + 1):
            counts = _explicit_keep(s_len, w, causal).sum(-1)
            s = ops.attention_scale(s_len, d, is_causal=causal, window=w)
            check(dict(is_causal=causal, window=w), counts, s, (causal, w))
    sparse = ops.block_sparse_mask(s_len, 8, 1, 2, causal=True)
    counts = sparse.sum(-1)
    check(dict(is_causal=True, static_mask=sparse), counts,
          ops.attention_scale_from_counts(counts, d), "sparse")


def test_bad_input_fails_clearly():
    q, k, v = _qkv(16)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match=r"window must be a positive int .* got"):
            plain.dot_product_attention(q, k, v, logit_scale=0.1, window=bad)
        with pytest.raises(ValueError, match="scaled_dot_product_attention: window must be"):
            ops.scaled_dot_product_attention(q, k, v, window=bad)
    with pytest.raises(ValueError, match="block 5 does not divide seq_len 16; use a block size "
                                         "that divides it"):
        ops.block_sparse_mask(16, 5)
    with pytest.raises(ValueError, match="n_local_blocks must be an int >= 1"):
        ops.block_sparse_mask(16, 4, 0)
    with pytest.raises(ValueError, match=r"static_mask must have shape \(q_len, kv_len\)"):
        plain.dot_product_attention(q, k, v, logit_scale=0.1, static_mask=np.ones((16, 8), bool))
    with pytest.raises(TypeError, match="static_mask must be boolean"):
        plain.dot_product_attention(q, k, v, logit_scale=0.1, static_mask=np.ones((16, 16)))
    with pytest.raises(ValueError, match="static_mask must be concrete"):
        jax.jit(lambda m: plain.dot_product_attention(q, k, v, logit_scale=0.1,
                                                      static_mask=m))(np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="no query sees any key"):
        ops.attention_scale_from_counts(np.zeros(4), 8)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="'cudnn' cannot run here: it needs a GPU"):
            plain.dot_product_attention(q, k, v, logit_scale=0.1, window=4,
                                        implementation="cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
def test_cudnn_causal_window_matches_chunked_and_bidirectional_is_refused():
    q, k, v = (a.astype(jnp.bfloat16) for a in _qkv(128, d=64))
    kw = dict(logit_scale=0.125, is_causal=True, window=32)
    assert plain.choose_implementation(q, k, "auto", window=32, is_causal=True) == "cudnn"
    got = jax.vjp(lambda q, k, v: plain.dot_product_attention(
        q, k, v, implementation="cudnn", **kw), q, k, v)
    want = jax.vjp(lambda q, k, v: plain.dot_product_attention(
        q, k, v, implementation="chunked", block_q=32, block_kv=32, **kw), q, k, v)
    g = _rand(9, q.shape).astype(jnp.bfloat16)
    chex.assert_trees_all_close(
        jax.tree.map(lambda a: a.astype(jnp.float32), (got[0], got[1](g))),
        jax.tree.map(lambda a: a.astype(jnp.float32), (want[0], want[1](g))), atol=3e-2,
        rtol=3e-2)
    assert plain.choose_implementation(q, k, "auto", window=32) != "cudnn"
    with pytest.raises(ValueError, match="sliding window is causal only"):
        plain.dot_product_attention(q, k, v, logit_scale=0.1, window=8, implementation="cudnn")
