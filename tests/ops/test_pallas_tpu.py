"""``implementation="pallas_tpu"`` (the TPU flash-attention kernel of
``jax.experimental.pallas.ops.tpu``), run on CPU in the Pallas TPU interpreter: XLA's values
and q, k, v gradients (odd lengths, padding masks, GQA / MQA, causal or not), the unit-scaled
op on top of it, and clear errors for what the kernel cannot take."""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from unitscale_jax import nn as unn
from unitscale_jax import ops
from unitscale_jax.ops import plain


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


def _qkv(t, s, heads, kv_heads, d=8, batch=2):
    return (_rand(0, (batch, t, heads, d)), _rand(1, (batch, s, kv_heads, d)),
            _rand(2, (batch, s, kv_heads, d)))


def _vjp(attn, q, k, v):
    """Output and q, k, v gradients for a fixed random cotangent, jitted."""
    def run(q, k, v):
        y, pullback = jax.vjp(attn, q, k, v)
        return y, pullback(_rand(99, y.shape))
    return jax.jit(run)(q, k, v)


# Interpreted kernels are slow: a few small cases that between them reach every path of the
# adapter (segment ids for padding only / for a key mask, a bias for a per-query mask).
CASES = {
    # odd lengths (padded to the blocks), key-padding mask -> segment ids, GQA 4 of 2
    "keys-gqa": dict(t=20, s=30, heads=4, kv_heads=2, causal=False, mask="keys"),
    # per-query mask -> additive bias, MQA, causal
    "rows-mqa-causal": dict(t=20, s=30, heads=2, kv_heads=1, causal=True, mask="rows"),
    # no mask, q longer than one block, causal; through the unit-scaled op
    "scaled-causal": dict(t=40, s=40, heads=2, kv_heads=2, causal=True, mask=None),
}


def _mask(kind, batch, t, s):
    if kind is None:
        return None
    keys = jnp.arange(s)[None, None, None, :] < jnp.array([s, s - 9])[:batch, None, None, None]
    if kind == "keys":
        return keys
    rows = ((jnp.arange(t)[:, None] + jnp.arange(s)[None, :]) % 5 != 1).at[:, 0].set(True)
    return jnp.logical_and(keys, rows[None, None])


@pytest.mark.parametrize("name", list(CASES))
def test_pallas_tpu_interpreted_matches_xla(name):
    c = CASES[name]
    q, k, v = _qkv(c["t"], c["s"], c["heads"], c["kv_heads"])
    mask = _mask(c["mask"], 2, c["t"], c["s"])

    def attn(impl):
        if name.startswith("scaled"):
            return lambda q, k, v: ops.scaled_dot_product_attention(
                q, k, v, is_causal=c["causal"], mult=2.0, implementation=impl, block_q=16,
                block_kv=128)
        return lambda q, k, v: plain.dot_product_attention(
            q, k, v, logit_scale=0.3, mask=mask, is_causal=c["causal"], implementation=impl,
            block_q=16, block_kv=128)

    with plain.pallas_tpu_interpret():
        got = _vjp(attn("pallas_tpu"), q, k, v)
    chex.assert_trees_all_close(got, _vjp(attn("xla"), q, k, v), rtol=1e-5, atol=2e-6)


def test_pallas_tpu_limits_are_clear_errors():
    q, k, v = _qkv(8, 8, 2, 2)
    if jax.default_backend() != "tpu":
        with pytest.raises(ValueError, match=r"'pallas_tpu' cannot run here: it needs a TPU, the "
                                             r"backend is 'cpu' .*pallas_tpu_interpret\(\)"):
            plain.dot_product_attention(q, k, v, logit_scale=1.0, implementation="pallas_tpu")
        with plain.pallas_tpu_interpret():    # "auto" never picks the interpreter
            assert plain.choose_implementation(q, k) != "pallas_tpu"
    with plain.pallas_tpu_interpret():
        q192, k192, v192 = _qkv(8, 8, 2, 2, d=192)
        with pytest.raises(ValueError, match="head_dim must be below 128 or a multiple of it, "
                                             "got 192"):
            plain.dot_product_attention(q192, k192, v192, logit_scale=1.0,
                                        implementation="pallas_tpu")
        with pytest.raises(ValueError, match="'pallas_tpu' needs block_kv a multiple of 128"):
            plain.dot_product_attention(q, k, v, logit_scale=1.0, implementation="pallas_tpu",
                                        block_kv=100)
        with pytest.raises(ValueError, match="'pallas_tpu' needs block_q a multiple of 8"):
            ops.scaled_dot_product_attention(q, k, v, implementation="pallas_tpu", block_q=12)
        with pytest.raises(ValueError, match="'pallas_tpu' cannot run here: it has no attention "
                                             "dropout"):
            plain.dot_product_attention(q, k, v, logit_scale=1.0, implementation="pallas_tpu",
                                        dropout_rate=0.1, rng=jax.random.key(0))


def test_pallas_tpu_config_limits():
    cfg = unn.TransformerConfig(vocab_size=64, d_model=64, n_layers=1, n_heads=2,
                                attention_impl="pallas_tpu")
    assert cfg.attention_block_q == plain.ATTENTION_BLOCK_Q == 512
    with pytest.raises(ValueError, match=r"TransformerConfig: implementation='pallas_tpu' needs "
                                         r"attention_block_kv a multiple of 128 \(the TPU "
                                         r"flash-attention kernel's tile\), got 200"):
        cfg.replace(attention_block_kv=200)
    with pytest.raises(ValueError, match="needs attention_block_q a multiple of 8 .*, got 4"):
        cfg.replace(attention_block_q=4)
    with pytest.raises(ValueError, match="'pallas_tpu' needs d_head below 128 or a multiple "
                                         "of it, got 160"):
        cfg.replace(d_head=160)
    with pytest.raises(ValueError, match="'pallas_tpu' has no attention dropout"):
        cfg.replace(dropout=0.1)
    assert cfg.replace(d_head=256).head_dim == 256
    with pytest.raises(ValueError, match="MultiHeadAttention: implementation='pallas_tpu' "
                                         "needs block_kv a multiple of 128"):
        unn.MultiHeadAttention(64, 2, attention_impl="pallas_tpu", block_kv=64,
                               rngs=nnx.Rngs(0))
