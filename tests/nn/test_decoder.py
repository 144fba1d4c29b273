"""TransformerDecoder: unit scale at init, SP contrast, masks, KV cache, metadata, errors."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.nn.helpers import flat_infos, loss_and_grads, random_ids, unstack_into
from unitscale_jax import nn as unn
from unitscale_jax.analysis import activation_stats
from unitscale_jax.params import ParamInfo

V = 4096
CFG = unn.TransformerConfig(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64)
SMALL = unn.TransformerConfig(vocab_size=128, d_model=32, n_layers=2, n_heads=2, max_seq_len=32)


def _loss(m, ids):
    return m.loss(ids)


def test_umup_activations_and_gradients_unit_scale_at_init():
    model = unn.TransformerDecoder(CFG, scan_layers=False, rngs=nnx.Rngs(0))
    stats = activation_stats(_loss, model, random_ids(1, (16, 32), V), include_params=True)
    params = {k: v for k, v in stats.items() if k.startswith("param/")}
    stats = {k: v for k, v in stats.items() if not k.startswith("param/")}
    assert len(stats) == 29 and len(params) == 12  # embed, 2 x 13 per layer, final norm, logits
    for name, (act, grad) in stats.items():
        if name.endswith("logits"):
            # the readout's 1/fan_in multiplier: logits std = d_model^-1/2 at init (u-muP)
            assert abs(act - 64 ** -0.5) < 0.03, (name, act)
        else:
            assert 0.5 <= act <= 2, (name, act)
        if name.endswith((".q", ".k")):
            # q and k gradients pass through the nearly flat softmax of init (logits
            # q.k / d_head ~ d_head^-1/2): ~ 1/sqrt(d_head ln S) of the output gradient, by
            # the design of u-muP's attention op (one scale for q, k and v, as the reference)
            assert 1 / 16 <= grad < 0.5, (name, grad)
        else:
            assert 0.5 <= grad <= 2, (name, grad)
    for name, (value, grad) in params.items():
        assert 0.9 <= value <= 1.1, (name, value)  # weights N(0, 1)
        assert 0.5 <= grad <= 2, (name, grad)


def test_sp_twin_gradients_far_from_unit():
    sp = unn.TransformerDecoder(CFG, parametrization="sp", scan_layers=False, rngs=nnx.Rngs(0))
    stats = activation_stats(_loss, sp, random_ids(1, (16, 32), V), include_params=True)
    params = {k: v for k, v in stats.items() if k.startswith("param/")}
    acts = [v for k, v in stats.items() if not k.startswith("param/")]
    assert all(g < 0.05 for _, g in params.values()), params  # weight gradients ~1e-3
    assert all(v < 0.021 for v, _ in params.values())  # N(0, 0.02) init (std estimates)
    assert max(g for _, g in acts) < 0.05  # every activation gradient tiny too
    assert min(a for a, _ in acts) < 0.01  # and some activations (MLP output) too


def test_reference_two_layer_check():
    """The reference's decoder test (scanned, with dropout): loss in [ln V / 2, 2 ln V], every
    parameter gradient std in [1/5, 5]."""
    model = unn.TransformerDecoder(CFG, dropout=0.1, rngs=nnx.Rngs(0))
    ids = random_ids(2, (16, 64), V)
    loss, grads = loss_and_grads(model, lambda m, i, k: m.loss(i, rng=k), ids, jax.random.key(3))
    assert math.log(V) / 2 < float(loss) < 2 * math.log(V)
    for path, g in grads.items():
        assert 1 / 5 <= float(np.std(g)) <= 5, path
    assert len(grads) == 2 + 5  # embedding, readout; stacked qkv, out, up, gate, down


def test_scanned_equals_unrolled():
    """Same parameters, same loss and gradients (the scanned stack rematerialised, too)."""
    cfg = SMALL.replace(rope=True, parametric_norm=True)
    scanned = unn.TransformerDecoder(cfg, remat=True, rngs=nnx.Rngs(0))
    unrolled = unn.TransformerDecoder(cfg, scan_layers=False, rngs=nnx.Rngs(1))
    unstack_into(scanned, unrolled)
    ids = random_ids(4, (4, 16), 128)
    l1, g1 = loss_and_grads(scanned, _loss, ids)
    l2, g2 = loss_and_grads(unrolled, _loss, ids)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * np.abs(b).max())  # noqa: E731
    for path, g in g1.items():
        if "layers" in path:
            i = path.index("layers")
            for layer in range(cfg.n_layers):
                close(g[layer], g2[path[:i + 1] + (layer,) + path[i + 1:]])
        else:
            close(g, g2[path])


@pytest.mark.parametrize("parametrization", ["umup", "sp"])
def test_causality(parametrization):
    model = unn.TransformerDecoder(SMALL, parametrization=parametrization, rngs=nnx.Rngs(0))
    ids = random_ids(5, (2, 16), 128)
    changed = ids.at[:, 9:].set((ids[:, 9:] + 17) % 128)
    run = nnx.jit(lambda m, i: m(i))
    a, b = run(model, ids), run(model, changed)
    chex.assert_trees_all_close(a[:, :9], b[:, :9], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 9:], b[:, 9:], atol=1e-4)


@pytest.mark.parametrize("scan", [True, False], ids=["scanned", "unrolled"])
def test_padding_mask_hides_pad_tokens(scan):
    model = unn.TransformerDecoder(SMALL, scan_layers=scan, rngs=nnx.Rngs(0))
    ids = random_ids(6, (2, 12), 128)
    mask = jnp.arange(12)[None, :] >= jnp.array([[4], [0]])  # row 0 left-padded by 4
    changed = ids.at[0, :4].set((ids[0, :4] + 99) % 128)
    run = nnx.jit(lambda m, i, k: (m(i, mask=k), m.loss(i, where=k, mask=k)))
    (a, la), (b, lb) = run(model, ids, mask), run(model, changed, mask)
    chex.assert_trees_all_close(a[0, 4:], b[0, 4:], rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(a[1], b[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    assert not np.allclose(a[0, :4], b[0, :4], atol=1e-4)
    unmasked = nnx.jit(lambda m, i: m(i))(model, changed)
    assert not np.allclose(unmasked[0, 4:], b[0, 4:], atol=1e-4)


@pytest.mark.parametrize("parametrization,scan,rope", [
    ("umup", True, False), ("umup", False, True), ("sp", True, True)])
def test_kv_cache_generation_matches_full_forward(parametrization, scan, rope):
    model = unn.TransformerDecoder(SMALL, parametrization=parametrization, scan_layers=scan,
                                   rope=rope, rngs=nnx.Rngs(0))
    prompt = random_ids(7, (3, 5), 128)
    tokens, logits = model.generate(prompt, 7, return_logits=True)
    assert tokens.shape == (3, 12) and logits.shape == (3, 7, 128)
    np.testing.assert_array_equal(tokens[:, :5], prompt)
    np.testing.assert_array_equal(tokens[:, 5:], jnp.argmax(logits, -1))
    full = nnx.jit(lambda m, t: m(t))(model, tokens)
    chex.assert_trees_all_close(logits, full[:, 4:11], rtol=1e-4, atol=1e-5)


def test_sampling():
    model = unn.TransformerDecoder(SMALL, rngs=nnx.Rngs(0))
    prompt = random_ids(8, (2, 3), 128)
    greedy = model.generate(prompt, 4)
    np.testing.assert_array_equal(model.generate(prompt, 4, temperature=1.0, top_k=1,
                                                 rng=jax.random.key(0)), greedy)
    s1 = model.generate(prompt, 4, temperature=1.0, top_k=1, rng=jax.random.key(1))
    np.testing.assert_array_equal(s1, greedy)  # same compiled function, another key
    hot = model.generate(jnp.tile(prompt[:1], (64, 1)), 4, temperature=5.0, rng=jax.random.key(2))
    assert len({tuple(r) for r in np.asarray(hot[:, 3:])}) > 1  # sampling varies across rows
    assert int(hot.min()) >= 0 and int(hot.max()) < 128
    with pytest.raises(ValueError, match="needs rng"):
        model.generate(prompt, 4, temperature=1.0)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model.generate(prompt, 30)


def test_param_info_of_every_parameter():
    for scan in (True, False):
        cfg = CFG.replace(n_layers=3, parametric_norm=True, bias=True, norm="layer",
                          scan_layers=scan)
        infos = flat_infos(nnx.eval_shape(lambda: unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))))
        expected_layer = {
            ("attn", "qkv_proj", "kernel"): ("weight", 64),
            ("attn", "qkv_proj", "bias"): ("bias", 192),
            ("attn", "out_proj", "kernel"): ("weight", 64),
            ("attn", "out_proj", "bias"): ("bias", 64),
            ("mlp", "up_proj", "kernel"): ("weight", 64), ("mlp", "up_proj", "bias"): ("bias", 256),
            ("mlp", "gate_proj", "kernel"): ("weight", 64),
            ("mlp", "gate_proj", "bias"): ("bias", 256),
            ("mlp", "down_proj", "kernel"): ("weight", 256),
            ("mlp", "down_proj", "bias"): ("bias", 64),
        }
        for norm in ("attn_norm", "mlp_norm"):
            expected_layer[(norm, "scale")] = ("norm", 64)
            expected_layer[(norm, "bias")] = ("bias", 64)
        expected = {("embed", "embedding"): ParamInfo("embedding", 64, None),
                    ("readout", "kernel"): ParamInfo("output", 64, None),
                    ("readout", "bias"): ParamInfo("bias", V, None),
                    ("final_norm", "scale"): ParamInfo("norm", 64, None),
                    ("final_norm", "bias"): ParamInfo("bias", 64, None)}
        for sub, (t, fan_in) in expected_layer.items():
            for layer in ([None] if scan else range(3)):
                prefix = ("stack", "layers") + (() if layer is None else (layer,))
                expected[prefix + sub] = ParamInfo(t, fan_in, 3)
        assert infos == expected


def test_bad_inputs():
    model = unn.TransformerDecoder(SMALL.replace(check_ids=True), rngs=nnx.Rngs(0))
    run = nnx.jit(lambda m, i: m.loss(i))
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(run(model, jnp.full((2, 8), 128)))
    with pytest.raises(ValueError, match="max_seq_len 32"):
        run(model, jnp.zeros((2, 33), jnp.int32))
    with pytest.raises(TypeError, match="integer token ids"):
        run(model, jnp.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        run(model, jnp.zeros((8,), jnp.int32))
    with pytest.raises(ValueError, match="padding mask must have shape"):
        nnx.jit(lambda m, i: m(i, mask=jnp.ones((2, 7), bool)))(model, jnp.zeros((2, 8), jnp.int32))
    with pytest.raises(TypeError, match="boolean"):
        nnx.jit(lambda m, i: m(i, mask=jnp.ones((2, 8))))(model, jnp.zeros((2, 8), jnp.int32))
    dropout = unn.TransformerDecoder(SMALL.replace(dropout=0.1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="pass rng"):
        run(dropout, jnp.zeros((2, 8), jnp.int32))
    dropout.eval()
    assert np.isfinite(float(run(dropout, jnp.zeros((2, 8), jnp.int32))))


def test_bf16_compute():
    model = unn.TransformerDecoder(SMALL.replace(dtype="bfloat16"), rngs=nnx.Rngs(0))
    ids = random_ids(9, (2, 16), 128)
    (loss, logits), grads = nnx.jit(lambda m: nnx.value_and_grad(
        lambda m: (m.loss(ids), m(ids)), has_aux=True)(m))(model)
    assert logits.dtype == jnp.bfloat16
    assert model.embed.embedding[...].dtype == jnp.float32
    assert abs(float(loss) - math.log(128)) < 0.5
    for g in jax.tree.leaves(nnx.state(grads, nnx.Param)):
        assert g.dtype == jnp.float32 and 0.3 < float(jnp.std(g)) < 3


def test_mup_twin_init_and_loss():
    model = unn.TransformerDecoder(SMALL, parametrization="mup", scan_layers=False,
                                   rngs=nnx.Rngs(0))
    layer = model.stack.layers[0]
    assert abs(float(jnp.std(layer.attn.qkv_proj.kernel[...])) - 32 ** -0.5) < 0.02
    assert abs(float(jnp.std(layer.mlp.down_proj.kernel[...])) - 128 ** -0.5) < 0.01  # fan_in d_ff
    assert abs(float(jnp.std(model.embed.embedding[...])) - 1) < 0.05
    assert abs(float(jnp.std(model.readout.kernel[...])) - 1) < 0.05
    loss = nnx.jit(_loss)(model, random_ids(10, (4, 16), 128))
    assert abs(float(loss) - math.log(128)) < 0.2  # readout 1/fan_in: near-uniform logits


@pytest.mark.parametrize("scan", [True, False])
def test_depth_exponent_carried_by_the_stack(scan):
    """CompleteP's a = 1: the stack's parameters carry it (the optimizer's depth factor reads
    it), the taus follow the rule, the rest of the model keeps the default, and activations and
    gradients stay at unit scale at init."""
    cfg = CFG.replace(n_layers=4, parametric_norm=True, depth_exponent=1.0, scan_layers=scan)
    model = unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))
    infos = flat_infos(model)
    for path, info in infos.items():
        in_stack = path[0] == "stack"
        assert info.depth == (4 if in_stack else None), path
        assert info.depth_exponent == (1.0 if in_stack else 0.5), path
    flat = [t for layer in model.stack.taus for t in layer]
    assert flat == list(unn.transformer.branch_taus(("attn", "mlp") * 4, depth_exponent=1.0))
    assert flat[0] == pytest.approx(1 / 4)  # alpha_attn / sqrt(n_layers^2)
    stats = activation_stats(_loss, model, random_ids(1, (16, 32), V))
    for name, (act, grad) in stats.items():
        if not name.endswith(("logits", ".q", ".k")):
            assert 0.5 <= act <= 2 and 0.5 <= grad <= 2, (name, act, grad)
    with pytest.raises(ValueError, match=r"depth_exponent must be in \[0.5, 1\]"):
        CFG.replace(depth_exponent=2.0)
