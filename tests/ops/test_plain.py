"""``ops.plain``: the unscaled cores are the ordinary maths, values and gradients.

The unit-scaled ops wrap these cores (``tests/ops/test_scales.py`` checks each op against
``alpha`` times the plain op); here each core is checked against the textbook formula written
with ``jnp``, so the standard parametrization, which uses them as they are, is plain SP.
"""

import chex
import jax
import jax.numpy as jnp
import pytest

from unitscale_jax.ops import plain


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


def _vjp(f, *args):
    y, pullback = jax.vjp(f, *args)
    return y, pullback(_rand(99, y.shape).astype(y.dtype))


def _same(f, g, *args, rtol=1e-5, atol=1e-6):
    chex.assert_trees_all_close(_vjp(f, *args), _vjp(g, *args), rtol=rtol, atol=atol)


def test_linear_and_embedding():
    x, w, b = _rand(0, (3, 5, 16)), _rand(1, (16, 8)), _rand(2, (8,))
    _same(lambda x, w, b: plain.linear(x, w, b, mult=0.25),
          lambda x, w, b: 0.25 * (x @ w + b), x, w, b)
    ids = jax.random.randint(jax.random.key(3), (4, 7), 0, 10)
    _same(lambda t: plain.embedding(ids, t), lambda t: jnp.take(t, ids, axis=0), _rand(4, (10, 6)))
    with pytest.raises(ValueError, match="out of range"):
        plain.embedding(jnp.array([10]), _rand(4, (10, 6)), check_ids=True)


def test_norms_and_activations():
    x, s, b = _rand(0, (6, 16)), 1 + 0.1 * _rand(1, (16,)), _rand(2, (16,))

    def ln(x, s, b):
        m = x.mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-5) * s + b

    _same(lambda x, s, b: plain.layer_norm(x, s, b), ln, x, s, b)
    _same(lambda x, s: plain.rms_norm(x, s),
          lambda x, s: x / jnp.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * s, x, s)
    _same(lambda x, g: plain.silu_glu(x, g, mult=2.0),
          lambda x, g: x * g * jax.nn.sigmoid(2.0 * g), x, b[None] * x)
    _same(lambda x: plain.gelu(x, mult=0.5),
          lambda x: jax.nn.gelu(0.5 * x, approximate=False) / 0.5, x)
    chex.assert_trees_all_equal(plain.dropout(x, 0.3, deterministic=True), x)
    y = plain.dropout(x, 0.5, rng=jax.random.key(0))
    assert set(jnp.unique(jnp.where(y == 0, 0.0, y / x).round(4)).tolist()) <= {0.0, 2.0}


@pytest.mark.parametrize("causal", [False, True])
def test_attention_and_cross_entropy(causal):
    q, k, v = (_rand(i, (2, 5, 2, 8)) for i in range(3))

    def ref(q, k, v):
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) * 0.3
        if causal:
            logits = jnp.where(jnp.tril(jnp.ones((5, 5), bool)), logits, -jnp.inf)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)

    _same(lambda q, k, v: plain.dot_product_attention(q, k, v, logit_scale=0.3, is_causal=causal),
          ref, q, k, v, atol=1e-5)
    logits, labels = 2 * _rand(4, (3, 4, 11)), jax.random.randint(jax.random.key(5), (3, 4), 0, 11)
    where = jnp.arange(12).reshape(3, 4) % 3 != 0

    def mean_nll(x):
        nll = -jnp.take_along_axis(jax.nn.log_softmax(x), labels[..., None], -1)[..., 0]
        return jnp.sum(nll * where) / jnp.sum(where)

    chex.assert_trees_all_close(
        jax.value_and_grad(lambda x: plain.cross_entropy(x, labels, where=where))(logits),
        jax.value_and_grad(mean_nll)(logits), rtol=1e-5, atol=1e-7)
