"""TransformerEncoderDecoder (T5-style): scales, seq2seq loss, cached generation, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.helpers import flat_infos, random_ids
from unitscale_jax import nn as unn
from unitscale_jax.analysis import activation_stats
from unitscale_jax.params import ParamInfo

V = 4096
CFG = unn.TransformerConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                            rope=True)


def _loss(m, src, tgt):
    return m.loss(src, tgt)


def test_umup_encoder_decoder_scales_at_init():
    model = unn.TransformerEncoderDecoder(CFG, scan_layers=False, rngs=nnx.Rngs(0))
    src, tgt = random_ids(1, (16, 32), V), random_ids(2, (16, 17), V)
    stats = activation_stats(_loss, model, src, tgt, include_params=True)
    params = {k: v for k, v in stats.items() if k.startswith("param/")}
    stats = {k: v for k, v in stats.items() if not k.startswith("param/")}
    for name, (act, grad) in stats.items():
        if name.endswith("logits"):
            assert abs(act - 64 ** -0.5) < 0.03
        elif "cross_attn.out" in name or "cross_attn.proj" in name:
            # values = encoder outputs, correlated across source positions after its
            # bidirectional attention: u-muP's ~sqrt(S_src) scale overshoots (~5 at S = 32)
            assert 2 <= act <= 8, (name, act)
        else:
            assert 0.5 <= act <= 3, (name, act)
        assert 1 / 128 <= grad <= 4, (name, grad)
    assert len(params) == 2 + 2 * 5 + 2 * 8
    for name, (_, grad) in params.items():
        lo = 1 / 100 if "q_proj" in name else 1 / 8  # cross-attention queries: flat softmax
        assert lo <= grad <= 5, (name, grad)
    loss = nnx.jit(_loss)(model, src, tgt)
    assert math.log(V) / 2 < float(loss) < 2 * math.log(V)


def test_param_info_and_depths():
    cfg = CFG.replace(n_decoder_layers=3)
    infos = flat_infos(unn.TransformerEncoderDecoder(cfg, rngs=nnx.Rngs(0)))
    assert infos[("embed", "embedding")] == ParamInfo("embedding", 64, None)
    assert infos[("readout", "kernel")] == ParamInfo("output", 64, None)
    assert infos[("encoder", "layers", "mlp", "down_proj", "kernel")] == ParamInfo("weight", 256, 2)
    dec = ("decoder", "layers")
    assert infos[dec + ("cross_attn", "q_proj", "kernel")] == ParamInfo("weight", 64, 3)
    assert infos[dec + ("cross_attn", "kv_proj", "kernel")] == ParamInfo("weight", 64, 3)
    assert infos[dec + ("cross_attn", "out_proj", "kernel")] == ParamInfo("weight", 64, 3)
    assert infos[dec + ("attn", "qkv_proj", "kernel")] == ParamInfo("weight", 64, 3)
    assert len(infos) == 2 + 5 + 8
    assert all(v.depth == (3 if k[0] == "decoder" else 2 if k[0] == "encoder" else None)
               for k, v in infos.items())


@pytest.mark.parametrize("parametrization,scan", [("umup", True), ("sp", False)])
def test_cached_generation_matches_full_forward(parametrization, scan):
    model = unn.TransformerEncoderDecoder(CFG.replace(vocab_size=256), scan_layers=scan,
                                          parametrization=parametrization, rngs=nnx.Rngs(0))
    src = random_ids(3, (3, 10), 256)
    src_mask = jnp.arange(10)[None, :] < jnp.array([[10], [7], [9]])
    tokens, logits = model.generate(src, 6, start_id=1, src_mask=src_mask, return_logits=True)
    assert tokens.shape == (3, 7) and logits.shape == (3, 6, 256)
    np.testing.assert_array_equal(tokens[:, 0], 1)
    np.testing.assert_array_equal(tokens[:, 1:], jnp.argmax(logits, -1))
    full = nnx.jit(lambda m, s, t: m(s, t, src_mask=src_mask))(model, src, tokens)
    chex.assert_trees_all_close(logits, full[:, :6], rtol=1e-4, atol=1e-5)


def test_seq2seq_loss_masks_and_causality():
    model = unn.TransformerEncoderDecoder(CFG.replace(vocab_size=256), rngs=nnx.Rngs(0))
    src, tgt = random_ids(4, (2, 8), 256), random_ids(5, (2, 6), 256)
    src_mask = jnp.array([[True] * 5 + [False] * 3, [True] * 8])
    tgt_mask = jnp.array([[True] * 4 + [False] * 2, [True] * 6])

    @nnx.jit
    def run(m, s, t):  # the loss feeds tgt[:, :-1] (u-muP's attention scale depends on length)
        return (m(s, t[:, :-1], src_mask=src_mask),
                m.loss(s, t, src_mask=src_mask, tgt_mask=tgt_mask))

    logits, loss = run(model, src, tgt)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[:, 1:, None], -1)[..., 0]
    counted = tgt_mask[:, 1:]
    np.testing.assert_allclose(loss, jnp.sum(nll * counted) / jnp.sum(counted), rtol=1e-5)
    # padded source tokens and padded / later target tokens change nothing that counts
    src2 = src.at[0, 5:].set(0)
    logits2, _ = run(model, src2, tgt.at[0, 4:].set(0).at[1, 4:].set(0))
    chex.assert_trees_all_close(logits2[0, :4], logits[0, :4], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(logits2[1, :4], logits[1, :4], rtol=1e-5, atol=1e-5)
    assert not np.allclose(logits2[1, 4:], logits[1, 4:], atol=1e-4)
    _, loss3 = run(model, src2, tgt.at[0, 4:].set(0))  # row 0's padded targets never count
    np.testing.assert_allclose(loss3, loss, rtol=1e-5)


def test_bad_inputs():
    model = unn.TransformerEncoderDecoder(CFG.replace(vocab_size=256, max_seq_len=16),
                                          rngs=nnx.Rngs(0))
    src, tgt = jnp.zeros((2, 8), jnp.int32), jnp.zeros((3, 5), jnp.int32)
    with pytest.raises(ValueError, match="source batch size 2 != target batch size 3"):
        model(src, tgt)
    with pytest.raises(ValueError, match="source batch size 2 != target batch size 3"):
        model.loss(src, tgt)
    with pytest.raises(ValueError, match="max_seq_len 16"):
        model(jnp.zeros((2, 17), jnp.int32), tgt[:2])
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(src, 16)
    with pytest.raises(ValueError, match="src_mask must have shape"):
        model.generate(src, 3, src_mask=jnp.ones((2, 7), bool))
    with pytest.raises(ValueError, match="start_id"):
        model.generate(src, 3, start_id=256)
