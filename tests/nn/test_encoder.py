"""TransformerEncoder (BERT-style): unit scale, MLM and fine-tuning heads, padding, metadata."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.helpers import flat_infos, loss_and_grads, random_ids
from unitscale_jax import nn as unn
from unitscale_jax.analysis import activation_stats
from unitscale_jax.params import ParamInfo

V = 4096
CFG = unn.TransformerConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                            rope=True)


def test_umup_encoder_unit_scale_at_init():
    model = unn.TransformerEncoder(CFG, scan_layers=False, rngs=nnx.Rngs(0))
    ids = random_ids(1, (16, 32), V)
    stats = activation_stats(lambda m, i: m.mlm_loss(i, i), model, ids, include_params=True)
    params = {k: v for k, v in stats.items() if k.startswith("param/")}
    stats = {k: v for k, v in stats.items() if not k.startswith("param/")}
    layer2_attn = [k for k in stats if k[:3] >= "018" and k.endswith(("attn.out", "attn.proj"))]
    assert len(layer2_attn) == 2
    for name, (act, grad) in stats.items():
        if name.endswith("logits"):
            assert abs(act - 64 ** -0.5) < 0.03
        elif name in layer2_attn:
            # Flat bidirectional attention at init gives every position nearly the same
            # output, so the next layer's values share a component that averaging does not
            # shrink while u-muP's scale (~sqrt(S), derived for independent values) still
            # multiplies it: layer-2 attention outputs sit near 3 at S = 32.
            assert 0.5 <= act <= 4, (name, act)
        else:
            assert 0.5 <= act <= 2, (name, act)
        if name.endswith((".q", ".k")):
            assert 1 / 16 <= grad < 0.5, (name, grad)  # flat softmax at init, as the decoder
        else:
            assert 0.5 <= grad <= 2, (name, grad)
    assert len(params) == 12
    for name, (_, grad) in params.items():
        assert 0.5 <= grad <= 2.5, (name, grad)


def test_mlm_where_and_heads():
    model = unn.TransformerEncoder(CFG, n_classes=3, n_token_classes=5, rngs=nnx.Rngs(0))
    ids = random_ids(2, (8, 16), V)
    where = jax.random.bernoulli(jax.random.key(3), 0.25, ids.shape)
    corrupted = jnp.where(where, 0, ids)

    @nnx.jit
    def run(m):
        logits = m(corrupted)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1)[..., 0]
        expected = jnp.sum(jnp.where(where, nll, 0)) / jnp.sum(where)
        return (m.mlm_loss(corrupted, ids, where), expected, m.classify(ids),
                m.classification_loss(ids, jnp.arange(8) % 3), m.tag(ids),
                m.token_classification_loss(ids, ids % 5))

    mlm, expected, cls, cls_loss, tags, tag_loss = run(model)
    np.testing.assert_allclose(mlm, expected, rtol=1e-5)
    assert cls.shape == (8, 3) and tags.shape == (8, 16, 5)
    assert abs(float(cls_loss) - math.log(3)) < 0.3 and abs(float(tag_loss) - math.log(5)) < 0.3
    infos = flat_infos(model)
    assert infos[("cls_head", "kernel")] == ParamInfo("output", 64, None)
    assert infos[("token_head", "kernel")] == ParamInfo("output", 64, None)
    assert infos[("readout", "kernel")] == ParamInfo("output", 64, None)
    assert infos[("stack", "layers", "attn", "qkv_proj", "kernel")] == ParamInfo("weight", 64, 2)
    assert len(infos) == 4 + 5  # embedding, three heads; qkv, out, up, gate, down
    bare = unn.TransformerEncoder(CFG, mlm_head=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="no sequence-classification head"):
        bare.classify(ids)
    with pytest.raises(ValueError, match="no MLM head"):
        bare(ids)
    with pytest.raises(ValueError, match="labels must have shape"):
        nnx.jit(lambda m: m.classification_loss(ids, jnp.zeros((7,), jnp.int32)))(model)
    with pytest.raises(ValueError, match="pooling"):
        unn.TransformerEncoder(CFG, pooling="max", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_padding_does_not_change_real_tokens(pooling):
    model = unn.TransformerEncoder(CFG.replace(vocab_size=256), n_classes=2, pooling=pooling,
                                   rngs=nnx.Rngs(0))
    ids = random_ids(4, (2, 12), 256)
    mask = jnp.arange(12)[None, :] < jnp.array([[8], [12]])  # row 0 right-padded by 4
    changed = ids.at[0, 8:].set((ids[0, 8:] + 5) % 256)
    run = nnx.jit(lambda m, i: (m.encode(i, mask=mask), m.classify(i, mask=mask), m.encode(i)))
    (h1, c1, u1), (h2, c2, u2) = run(model, ids), run(model, changed)
    chex.assert_trees_all_close(h1[0, :8], h2[0, :8], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(c1, c2, rtol=1e-5, atol=1e-5)
    assert not np.allclose(u1[0, :8], u2[0, :8], atol=1e-4)  # bidirectional without the mask


def test_sp_encoder_gradients_far_from_unit():
    model = unn.TransformerEncoder(CFG, parametrization="sp", rngs=nnx.Rngs(0))
    loss, grads = loss_and_grads(model, lambda m, i: m.mlm_loss(i, i), random_ids(5, (8, 32), V))
    assert abs(float(loss) - math.log(V)) < 0.1
    assert all(float(np.std(g)) < 0.05 for g in grads.values())


def test_encoder_bad_inputs():
    model = unn.TransformerEncoder(CFG.replace(vocab_size=256, check_ids=True, max_seq_len=16),
                                   rngs=nnx.Rngs(0))
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(nnx.jit(lambda m: m(jnp.full((1, 4), 300)))(model))
    with pytest.raises(ValueError, match="max_seq_len 16"):
        model.encode(jnp.zeros((1, 17), jnp.int32))
