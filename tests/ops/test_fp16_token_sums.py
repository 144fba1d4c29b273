"""Parameter gradients that sum over many tokens stay finite in float16.

``beta_w = B^-1/2`` (and the embedding's and norm gains' scales) bring a token sum back to
unit scale, but only if the sum itself does not overflow first: these cases have raw sums of
about 2^17 (float16's largest value is 65504) and scaled results of order 1-2^13."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import nn as unn
from unitscale_jax import ops
from unitscale_jax.precision import get_policy

TOKENS = 2 ** 14


def _english_bytes(n: int) -> bytes:
    from unitscale_jax.data.corpus import builtin_documents
    text = "\n".join(t for _, t in builtin_documents()).encode()
    return (text * (n // len(text) + 1))[:n]


def _grads(fn, args, g):
    y, pullback = jax.vjp(fn, *args)
    return pullback(jnp.broadcast_to(jnp.asarray(g, y.dtype), y.shape))


def _compare(fn, args16, g):
    got = _grads(fn, args16, g)
    want = _grads(fn, [a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a
                       for a in args16], g)
    for a, b in zip(got, want):
        if a is None or not jnp.issubdtype(a.dtype, jnp.floating):
            continue
        assert bool(jnp.all(jnp.isfinite(a))), "a float16 gradient overflowed"
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-3, atol=1e-3)
    return got


@pytest.mark.parametrize("op", [ops.linear, ops.linear_readout])
def test_linear_kernel_and_bias_gradients(op):
    x = jnp.full((TOKENS, 16), 4.0, jnp.float16)
    w = jnp.ones((16, 8), jnp.float16)
    b = jnp.zeros((8,), jnp.float16)
    dx, dw, db = _compare(lambda x, w, b: op(x, w, b), [x, w, b], 2.0)
    # raw x^T g = 2^14 * 8 = 131072 > 65504; times B^-1/2 = 2^-7: 1024
    np.testing.assert_allclose(np.asarray(dw, np.float32), 1024.0)
    np.testing.assert_allclose(np.asarray(db, np.float32), 256.0)


def test_plain_linear_kernel_and_bias_gradients():
    """The SP / muP projection (``ops.plain.linear``) sums its token sums in float32 too."""
    x = jnp.full((TOKENS, 16), 4.0, jnp.float16)
    w = jnp.ones((16, 8), jnp.float16)
    b = jnp.zeros((8,), jnp.float16)
    _, dw, db = _compare(lambda x, w, b: ops.plain.linear(x, w, b, mult=2.0 ** -7), [x, w, b], 2.0)
    np.testing.assert_allclose(np.asarray(dw, np.float32), 1024.0)
    np.testing.assert_allclose(np.asarray(db, np.float32), 256.0)


def test_embedding_table_gradient():
    ids = jnp.zeros((TOKENS,), jnp.int32)  # one row used by every token
    table = jnp.ones((64, 8), jnp.float16)
    (dt,) = _compare(lambda t: ops.embedding(ids, t), [table], 8.0)
    # raw row sum 2^14 * 8 = 131072; times sqrt(64 / 2^14) = 2^-4: 8192
    np.testing.assert_allclose(np.asarray(dt[0], np.float32), 8192.0)
    np.testing.assert_array_equal(np.asarray(dt[1:], np.float32), 0.0)


@pytest.mark.parametrize("norm", ["rms_norm", "layer_norm"])
def test_norm_gain_and_bias_gradients(norm):
    x = jax.random.normal(jax.random.key(0), (TOKENS, 8)).astype(jnp.float16)
    scale = jnp.ones((8,), jnp.float16)
    if norm == "rms_norm":
        fn, args = (lambda x, s: ops.rms_norm(x, s)), [x, scale]
    else:
        fn, args = ((lambda x, s, b: ops.layer_norm(x, s, b)),
                    [x, scale, jnp.zeros((8,), jnp.float16)])
    g = 8.0 * jnp.sign(x.astype(jnp.float32))  # correlated with x: the gain's sum grows as B
    y, pullback = jax.vjp(fn, *args)
    got = pullback(g.astype(y.dtype))
    y32, pullback32 = jax.vjp(fn, *[a.astype(jnp.float32) for a in args])
    want = pullback32(g)
    for a, b in zip(got[1:], want[1:]):
        assert bool(jnp.all(jnp.isfinite(a)))
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=2e-3)


@pytest.mark.parametrize("precision", [None, "fp16"])
def test_umup_decoder_float16_at_16k_tokens_per_step(precision):
    """A u-muP decoder step at 256 x 64 tokens: every gradient finite, close to float32's.
    (Before the float32 accumulation, the readout's kernel gradient was inf here.)"""
    # English text's byte statistics (frequent spaces and letters) correlate the readout's
    # token sums; the built-in corpus is English prose
    text = np.frombuffer(_english_bytes(256 * 64), np.uint8)
    ids = jnp.asarray(text.reshape(256, 64).astype(np.int32))
    kw = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)

    def grads(dtype, policy):
        model = unn.TransformerDecoder(**kw, dtype=dtype, precision=policy, rngs=nnx.Rngs(0))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest).loss(ids)))(params)

    g16 = grads(jnp.float16, None if precision is None else get_policy(precision))
    g32 = grads(jnp.float32, None)
    for (path, a), (_, b) in zip(nnx.to_flat_state(g16), nnx.to_flat_state(g32)):
        a, b = np.asarray(a[...], np.float32), np.asarray(b[...], np.float32)
        assert np.all(np.isfinite(a)), path
        assert np.abs(a - b).max() <= 0.05 * np.abs(b).max(), path
