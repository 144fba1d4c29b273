"""``TransformerConfig.attention_impl``: the chunked backend gives a model the XLA backend's
loss and gradients, through padding masks and the KV-cache decode path."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.helpers import loss_and_grads, random_ids
from unitscale_jax import nn as unn

# 530 tokens: two key blocks of the default 512, the second one partial
CFG = unn.TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=530)


def _model(impl, parametrization="umup", **kw):
    return unn.TransformerDecoder(CFG, attention_impl=impl, parametrization=parametrization,
                                  rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize("parametrization", ["umup", "sp"])
def test_chunked_decoder_same_loss_and_gradients_as_xla(parametrization):
    ids = random_ids(1, (2, 530), 64)
    mask = jnp.arange(530)[None, :] < jnp.array([[530], [300]])   # row 1 padded after 300

    def loss(m, ids, mask):
        return m.loss(ids, mask=mask)

    la, ga = loss_and_grads(_model("chunked", parametrization), loss, ids, mask)
    lb, gb = loss_and_grads(_model("xla", parametrization), loss, ids, mask)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    assert ga.keys() == gb.keys()
    chex.assert_trees_all_close(ga, gb, rtol=2e-4, atol=2e-6)


def test_chunked_kv_cache_generation_matches_full_forward():
    """Decode steps (q_len = 1 against the cache, an explicit mask) equal the full forward
    pass, and the XLA backend's generation."""
    model = _model("chunked", scan_layers=False, rope=True)
    prompt = random_ids(7, (2, 5), 64)
    tokens, logits = model.generate(prompt, 6, return_logits=True)
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    chex.assert_trees_all_close(logits, full[:, 4:10], rtol=1e-4, atol=1e-5)
    xla_tokens, xla_logits = _model("xla", scan_layers=False, rope=True).generate(
        prompt, 6, return_logits=True)
    np.testing.assert_array_equal(tokens, xla_tokens)
    chex.assert_trees_all_close(logits, xla_logits, rtol=1e-5, atol=1e-6)


def test_attention_impl_is_checked():
    with pytest.raises(ValueError, match=r"attention_impl must be one of \('auto', 'xla', "
                                         r"'cudnn', 'chunked', 'pallas_tpu'\), got 'flash'"):
        unn.TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                              attention_impl="flash")
    with pytest.raises(ValueError, match="'chunked' has no attention dropout"):
        CFG.replace(attention_impl="chunked", dropout=0.1)
    with pytest.raises(ValueError, match="MultiHeadAttention: attention_impl must be one of"):
        unn.MultiHeadAttention(32, 2, attention_impl="dense", rngs=nnx.Rngs(0))
    assert CFG.attention_impl == "auto"


def test_chunked_encoder_decoder_same_loss_and_gradients_as_xla():
    """Bidirectional self attention and cross attention with a source padding mask."""
    cfg = unn.TransformerConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2,
                                max_seq_len=40, rope=True)
    src, tgt = random_ids(2, (2, 37), 64), random_ids(3, (2, 23), 64)
    src_mask = jnp.arange(37)[None, :] < jnp.array([[37], [20]])

    def loss(m, src, tgt, src_mask):
        return m.loss(src, tgt, src_mask=src_mask)

    la, ga = loss_and_grads(unn.TransformerEncoderDecoder(
        cfg, attention_impl="chunked", rngs=nnx.Rngs(0)), loss, src, tgt, src_mask)
    lb, gb = loss_and_grads(unn.TransformerEncoderDecoder(
        cfg, attention_impl="xla", rngs=nnx.Rngs(0)), loss, src, tgt, src_mask)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    chex.assert_trees_all_close(ga, gb, rtol=2e-4, atol=2e-6)
