"""LoRA adapters (``unitscale_jax.nn.lora``): zero-B is the base model, merge equals unmerged,
the adapters' metadata and u-muP learning-rate factors, targets and bad settings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import nn as unn
from unitscale_jax import optim
from unitscale_jax.nn import lora

ALL = "qkv,attn_out,ffn_up,ffn_gate,ffn_down"


def _config(**kw):
    base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8)
    return unn.TransformerConfig(**{**base, **kw})


def _pair(cls=unn.TransformerDecoder, targets=ALL, rank=4, **kw):
    """A base model and the same model with adapters (same base parameters)."""
    extra = {"n_classes": 3} if cls is unn.TransformerEncoder else {}
    cfg = _config(**kw)
    base = cls(cfg, rngs=nnx.Rngs(0), **extra)
    adapted = cls(cfg.replace(lora_targets=targets, lora_rank=rank), rngs=nnx.Rngs(1), **extra)
    nnx.update(adapted, nnx.state(base, nnx.Param))
    return base, adapted


def _randomise_b(model, seed=3):
    for i, (_, layer) in enumerate(lora.adapted_layers(model)):
        b = layer.lora.b
        b[...] = jax.random.normal(jax.random.key(seed + i), b[...].shape)


IDS = jnp.arange(16).reshape(2, 8) % 32


@pytest.mark.parametrize("scan", [True, False])
def test_zero_b_adapter_changes_nothing(scan):
    base, adapted = _pair(scan_layers=scan)
    np.testing.assert_array_equal(np.asarray(adapted(IDS)), np.asarray(base(IDS)))
    # the base parameters' gradients are the base model's too
    def grads(model):
        g = nnx.grad(lambda m: m.loss(IDS))(model)
        return {k: v for k, v in nnx.to_flat_state(g) if "lora" not in k}
    g0, g1 = grads(base), grads(adapted)
    assert g0.keys() == g1.keys()
    for k in g0:
        np.testing.assert_allclose(np.asarray(g1[k][...]), np.asarray(g0[k][...]), rtol=1e-5,
                                   atol=1e-7, err_msg=str(k))
    # and a non-zero B does change the function
    _randomise_b(adapted)
    assert float(jnp.abs(adapted(IDS) - base(IDS)).max()) > 1e-2


@pytest.mark.parametrize("parametrization,scan", [("umup", True), ("umup", False),
                                                  ("sp", True)])
def test_merge_equals_unmerged(parametrization, scan):
    _, adapted = _pair(parametrization=parametrization, scan_layers=scan)
    _randomise_b(adapted)
    before = np.asarray(adapted(IDS))
    n = unn.merge_lora(adapted)
    assert n == 2 * 5 if not scan else n == 5  # one adapted module per role (stacked when scanned)
    for _, layer in lora.adapted_layers(adapted):
        assert not np.any(np.asarray(layer.lora.b[...]))
    np.testing.assert_allclose(np.asarray(adapted(IDS)), before, rtol=1e-4, atol=1e-5)


def test_merged_kernel_in_a_base_model_gives_the_same_outputs():
    base, adapted = _pair(unn.TransformerEncoder, targets="qkv,ffn_down", rank=2)
    _randomise_b(adapted)
    want = np.asarray(adapted.classify(IDS))
    unn.merge_lora(adapted)
    flat = {k: v for k, v in nnx.to_flat_state(nnx.state(adapted, nnx.Param))
            if "lora" not in k}
    nnx.update(base, nnx.from_flat_state(flat))
    np.testing.assert_allclose(np.asarray(base.classify(IDS)), want, rtol=1e-4, atol=1e-5)


def test_targets_pick_the_projections():
    _, adapted = _pair(targets="attn_out,ffn_up", scan_layers=False)
    roles = sorted({m.role for _, m in lora.adapted_layers(adapted)})
    assert roles == ["attn.out_proj", "mlp.up_proj"]
    _, gelu = _pair(targets="ffn_gate", mlp="gelu", scan_layers=False)
    assert lora.adapted_layers(gelu) == []  # no gate projection to adapt
    assert _config().lora_spec is None and _config(lora_targets="").lora_spec is None


def test_adapter_metadata_and_umup_factors():
    d, r, depth = 16, 4, 2
    _, adapted = _pair(targets="qkv,ffn_down", rank=r, n_layers=depth, ffn_mult=2.0)
    info = nnx.to_pure_dict(unn.param_info(adapted))["stack"]["layers"]
    qa, qb = info["attn"]["qkv_proj"]["lora"]["a"], info["attn"]["qkv_proj"]["lora"]["b"]
    da = info["mlp"]["down_proj"]["lora"]["a"]
    assert qa == unn.ParamInfo("weight", d, depth) and qb == unn.ParamInfo("weight", r, depth)
    assert da == unn.ParamInfo("weight", 2 * d, depth)  # fan-in of down_proj: d_ff
    fa, fb = optim.umup_factor(qa), optim.umup_factor(qb)
    np.testing.assert_allclose([fa, fb], [(d * depth) ** -0.5, (r * depth) ** -0.5])
    np.testing.assert_allclose(fb / fa, (d / r) ** 0.5)  # B's rate above A's (LoRA+)
    # A is N(0, 1) under u-muP and B zero; shapes [layers, fan_in, r] / [layers, r, fan_out]
    a = adapted.stack.layers.attn.qkv_proj.lora.a[...]
    assert a.shape == (depth, d, r) and 0.6 < float(jnp.std(a)) < 1.4


def test_adapter_output_is_unit_scaled_when_b_is_unit():
    """With A and B both N(0, 1), ``linear(linear(x, A), B)`` keeps a unit-scale input at unit
    scale (u-muP), and its SP form is the plain ``x A B`` (A init std d_in^-1/2)."""
    d, r = 256, 16
    x = jax.random.normal(jax.random.key(0), (512, d))
    ad = lora.LoRAAdapter(d, d, rank=r, mult=1.0, rngs=nnx.Rngs(0))
    ad.b[...] = jax.random.normal(jax.random.key(1), (r, d))
    assert 0.85 < float(jnp.std(ad(x))) < 1.15
    sp = lora.LoRAAdapter(d, d, rank=r, mult=0.5, rngs=nnx.Rngs(0), parametrization="sp")
    sp.b[...] = jnp.ones((r, d))
    np.testing.assert_allclose(np.asarray(sp(x)), np.asarray(0.5 * x @ sp.a[...] @ sp.b[...]),
                               rtol=1e-4, atol=1e-4)
    assert 0.8 < float(jnp.std(sp.a[...])) * d ** 0.5 < 1.2


@pytest.mark.parametrize("kw,needle", [
    (dict(lora_targets="qkv,mlp_up"), "'mlp_up'; the valid targets are qkv, attn_out, ffn_up, "
                                      "ffn_gate, ffn_down"),
    (dict(lora_targets="qkv", lora_rank=0), "LoRA rank must be a positive int"),
    (dict(lora_rank=-2), "LoRA rank must be a positive int"),
    (dict(lora_targets="qkv", lora_mult=0.0), "LoRA mult must be a finite float > 0"),
])
def test_bad_lora_settings(kw, needle):
    with pytest.raises(ValueError, match="TransformerConfig") as e:
        _config(**kw)
    assert needle in str(e.value)
