"""Layers of unitscale_jax.nn: unit scale, parametrization switch, metadata, hooks, residuals."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import nn as unn
from unitscale_jax import ops
from unitscale_jax.params import ParamInfo


def _std(x):
    return float(jnp.std(x))


def _infos(model):
    return {tuple(p): v for p, v in nnx.to_flat_state(unn.param_info(model))}


def _grad_std(layer, x):
    """Output std, input-gradient std and kernel-gradient stds for a unit cotangent (jitted)."""
    graphdef, params = nnx.split(layer, nnx.Param)

    @jax.jit
    def run(params, x):
        def f(params, x):
            return nnx.merge(graphdef, params)(x)
        y, vjp = jax.vjp(f, params, x)
        gp, gx = vjp(jax.random.normal(jax.random.key(7), y.shape))
        return y, gx, gp

    return run(params, x)


@pytest.mark.parametrize("constraint", ["to_output_scale", None])
def test_linear_is_ops_linear_and_unit_scaled(constraint):
    # to_output_scale ties the input gradient's scale to fan_in^-1/2: unit only when square
    fan_out = 256 if constraint else 512
    layer = unn.Linear(256, fan_out, rngs=nnx.Rngs(0), constraint=constraint)
    x = jax.random.normal(jax.random.key(1), (1024, 256))
    y, gx, gp = _grad_std(layer, x)
    chex.assert_trees_all_close(y, ops.linear(x, layer.kernel[...], constraint=constraint),
                                rtol=1e-6)
    for t in (y, gx, gp["kernel"][...], layer.kernel[...]):
        assert abs(_std(t) - 1) < 0.1
    assert _infos(layer)[("kernel",)] == ParamInfo("weight", 256, None)


def test_sp_and_mup_linear_init_and_plain_maths():
    x = jax.random.normal(jax.random.key(1), (64, 256))
    sp = unn.Linear(256, 128, rngs=nnx.Rngs(0), parametrization="sp", init_std=0.02)
    assert abs(_std(sp.kernel[...]) - 0.02) < 0.002
    chex.assert_trees_all_close(sp(x), x @ sp.kernel[...], rtol=1e-6)
    lecun = unn.Linear(256, 128, rngs=nnx.Rngs(0), parametrization="sp", init_std=None)
    assert abs(_std(lecun.kernel[...]) - 256 ** -0.5) < 0.01
    mup = unn.Linear(256, 128, rngs=nnx.Rngs(0), parametrization="mup")
    assert abs(_std(mup.kernel[...]) - 256 ** -0.5) < 0.01
    ro = unn.LinearReadout(256, 128, rngs=nnx.Rngs(0), parametrization="mup", bias=True)
    chex.assert_trees_all_close(ro(x), (x @ ro.kernel[...] + ro.bias[...]) / 256, rtol=1e-6)
    # the twins' fused linear has the ordinary gradient of the plain maths
    for layer, plain in ((sp, lambda x, w, b: x @ w), (ro, lambda x, w, b: (x @ w + b) / 256)):
        w = layer.kernel[...]
        b = None if layer.bias is None else layer.bias[...]
        (y1, g1), (y2, g2) = _vjp_both(
            lambda x, w: layer.parametrization.readout(x, w, b) if layer.readout
            else layer.parametrization.linear(x, w, b),
            lambda x, w: plain(x, w, b), (x, w))
        chex.assert_trees_all_close((y1, g1), (y2, g2), rtol=1e-5, atol=1e-6)


def test_readout_output_scale_and_type():
    layer = unn.LinearReadout(256, 1024, rngs=nnx.Rngs(0), bias=True)
    x = jax.random.normal(jax.random.key(1), (512, 256))
    y, gx, gp = _grad_std(layer, x)
    assert abs(_std(y) - 256 ** -0.5) < 0.01
    assert abs(_std(gx) - 1) < 0.1 and abs(_std(gp["kernel"][...]) - 1) < 0.1
    info = _infos(layer)
    assert info[("kernel",)] == ParamInfo("output", 256, None)
    assert info[("bias",)] == ParamInfo("bias", 1024, None)


def test_embedding_scale_metadata_and_id_check():
    emb = unn.Embedding(512, 64, rngs=nnx.Rngs(0), check_ids=True)
    assert _infos(emb)[("embedding",)] == ParamInfo("embedding", 64, None)
    ids = jax.random.randint(jax.random.key(1), (16, 32), 0, 512)
    graphdef, params = nnx.split(emb, nnx.Param)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(
        nnx.merge(graphdef, p)(ids) * jax.random.normal(jax.random.key(2), (16, 32, 64)))))(params)
    # each row's gradient sums ~ids.size/vocab unit cotangents, times sqrt(vocab/ids.size)
    assert 0.7 < _std(grad["embedding"][...]) < 1.4
    with pytest.raises(ValueError, match="out of range"):
        emb(jnp.array([[0, 512]]))
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(nnx.jit(lambda m, i: m(i))(emb, jnp.array([[3, -1]])))
    with pytest.raises(TypeError, match="integer"):
        emb(jnp.ones((2, 3)))


@pytest.mark.parametrize("cls", [unn.RMSNorm, unn.LayerNorm])
def test_norms_nonparametric_by_default(cls):
    x = 3.0 + 5.0 * jax.random.normal(jax.random.key(0), (8, 16, 32))
    assert not jax.tree.leaves(nnx.state(cls(32), nnx.Param))
    y = cls(32)(x)
    assert abs(float(jnp.sqrt(jnp.mean(y ** 2))) - 1) < 0.01  # RMS 1 (LayerNorm: mean 0 too)
    norm = cls(32, use_scale=True) if cls is unn.RMSNorm else cls(32, use_scale=True, use_bias=True)
    info = _infos(norm)
    assert info[("scale",)] == ParamInfo("norm", 32, None)
    if cls is unn.LayerNorm:
        assert info[("bias",)] == ParamInfo("bias", 32, None)
    chex.assert_trees_all_close(norm(x), y, rtol=1e-6)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_mlp_unit_scaled(kind):
    mlp = unn.MLP(256, 1024, kind=kind, rngs=nnx.Rngs(0), depth=4)
    x = jax.random.normal(jax.random.key(1), (512, 256))
    y, gx, gp = _grad_std(mlp, x)
    assert abs(_std(y) - 1) < 0.25, _std(y)
    # SwiGLU's input feeds two unit-scaled projections: their gradients add up to sqrt(2)
    assert abs(_std(gx) - (2 ** 0.5 if kind == "swiglu" else 1)) < 0.25, _std(gx)
    for g in jax.tree.leaves(gp):
        assert abs(_std(g) - 1) < 0.3
    info = _infos(mlp)
    assert info[("down_proj", "kernel")] == ParamInfo("weight", 1024, 4)
    assert info[("up_proj", "kernel")] == ParamInfo("weight", 256, 4)
    assert (("gate_proj", "kernel") in info) == (kind == "swiglu")
    with pytest.raises(ValueError, match="MLP kind"):
        unn.MLP(8, 8, kind="relu", rngs=nnx.Rngs(0))


def test_attention_self_cross_shapes_metadata_and_masks():
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 48))
    self_attn = unn.MultiHeadAttention(32, 4, causal=True, rngs=nnx.Rngs(0), depth=3)
    assert jax.eval_shape(lambda: self_attn(x)).shape == (2, 8, 32)
    info = _infos(self_attn)
    assert info[("qkv_proj", "kernel")] == ParamInfo("weight", 32, 3)
    assert info[("out_proj", "kernel")] == ParamInfo("weight", 32, 3)
    assert self_attn.qkv_proj.kernel.shape == (32, 96)
    assert self_attn.qkv_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    cross = unn.MultiHeadAttention(32, 4, cross=True, d_context=48, rngs=nnx.Rngs(0))
    assert _infos(cross)[("kv_proj", "kernel")] == ParamInfo("weight", 48, None)
    # a key-padding mask hides context positions: changing them changes nothing
    keep = jnp.array([[True] * 3 + [False] * 2] * 2)[:, None, None, :]
    ctx2 = ctx.at[:, 3:].set(7.0)
    run = nnx.jit(lambda m, c, k: m(x, context=c, mask=k))
    out = run(cross, ctx, keep)
    assert out.shape == (2, 8, 32)
    chex.assert_trees_all_close(out, run(cross, ctx2, keep), rtol=1e-6, atol=1e-6)
    assert not np.allclose(run(cross, ctx, None), run(cross, ctx2, None))
    with pytest.raises(ValueError, match="context batch"):
        cross(x, context=ctx[:1])
    with pytest.raises(ValueError, match="needs a context"):
        cross(x)
    with pytest.raises(ValueError, match="cannot be causal"):
        unn.MultiHeadAttention(32, 4, cross=True, causal=True, rngs=nnx.Rngs(0))


def test_sp_attention_uses_inverse_sqrt_dhead():
    attn = unn.MultiHeadAttention(32, 4, rngs=nnx.Rngs(0), parametrization="sp")
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))

    @nnx.jit
    def both(attn):
        q, k, v = attn._split(x @ attn.qkv_proj.kernel[...], 3)
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) / jnp.sqrt(8.0)
        out = jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v).reshape(2, 6, 32)
        return attn(x), out @ attn.out_proj.kernel[...]

    chex.assert_trees_all_close(*both(attn), rtol=1e-5, atol=1e-6)


def test_rope_preserves_norm_and_is_relative():
    x = jax.random.normal(jax.random.key(0), (1, 6, 2, 8))
    pos = jnp.arange(6)[None]
    r = jax.jit(unn.rope)(x, pos)
    chex.assert_trees_all_close(jnp.linalg.norm(r, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    q, k = x[:, :1], x[:, 1:2]
    dot = jax.jit(lambda a, b: jnp.sum(unn.rope(q, jnp.array([[a]]))
                                       * unn.rope(k, jnp.array([[b]]))))
    np.testing.assert_allclose(dot(3, 1), dot(7, 5), rtol=1e-5)
    assert abs(float(dot(3, 1) - dot(3, 2))) > 1e-4


def test_cached_attention_equals_full():
    attn = unn.MultiHeadAttention(32, 4, causal=True, use_rope=True, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 32))

    @nnx.jit
    def run(attn):
        cache = {"k": jnp.zeros((2, 8, 4, 8)), "v": jnp.zeros((2, 8, 4, 8))}
        first, cache = attn(x[:, :5], cache=cache, cache_index=0)
        outs = [first]
        for t in range(5, 8):
            y, cache = attn(x[:, t:t + 1], cache=cache, cache_index=jnp.int32(t))
            outs.append(y)
        return attn(x), jnp.concatenate(outs, 1)

    full, cached = run(attn)
    chex.assert_trees_all_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tau", [0.3, 1.7])
def test_traced_tau_residual_matches_static(tau):
    """A scanned stack passes each layer's tau as a constant array: same values and
    gradients as the Python float, for the split/add pair and for residual_apply."""
    x = jax.random.normal(jax.random.key(0), (4, 16))
    w = jax.random.normal(jax.random.key(1), (16, 16))

    def pair(tau_):
        def f(x, w):
            r, s = ops.residual_split(x, tau_)
            return jnp.sum(ops.residual_add(ops.linear(r, w), s, tau_) * jnp.arange(16.0))
        return jax.value_and_grad(f, argnums=(0, 1))(x, w)

    def applied(tau_):
        def f(x, w):
            return jnp.sum(ops.residual_apply(lambda r: ops.linear(r, w), x, tau_)
                           * jnp.arange(16.0))
        return jax.value_and_grad(f, argnums=(0, 1))(x, w)

    ref = jax.jit(lambda: pair(tau))()
    chex.assert_trees_all_close(jax.jit(pair)(jnp.float32(tau)), ref, rtol=1e-5)
    chex.assert_trees_all_close(jax.jit(lambda: applied(tau))(), ref, rtol=1e-5)
    chex.assert_trees_all_close(jax.jit(applied)(jnp.float32(tau)), ref, rtol=1e-5)
    with pytest.raises(ValueError, match="scalar"):
        ops.residual_split(x, jnp.ones(2))


def test_branch_taus():
    rule = ops.transformer_residual_scaling_rule(0.5, 2.0)
    taus = unn.branch_taus(("attn", "mlp") * 3, 0.5, 2.0)
    assert taus == tuple(rule(i, 6) for i in range(6))
    # cross-attention stacks: tau_i = alpha_i / sqrt(n_layers + sum_{j<i} alpha_j^2)
    t = unn.branch_taus(("attn", "attn", "mlp") * 2)
    np.testing.assert_allclose(t, [1 / 2 ** 0.5, 1 / 3 ** 0.5, 1 / 2, 1 / 5 ** 0.5, 1 / 6 ** 0.5,
                                   1 / 7 ** 0.5])
    with pytest.raises(ValueError, match="branch kinds"):
        unn.branch_taus(("attn", "ffn"))


@dataclasses.dataclass(frozen=True)
class _RecordingPolicy:
    """Records the roles it is called with (at trace time) and scales outputs by ``factor``."""

    factor: float = 1.0
    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def cast_compute(self, x):
        return x

    def dot_general(self, role, *, layer=None, rng=None):
        self.seen.append((role, layer))
        return lambda a, b, dims, **kw: self.factor * jax.lax.dot_general(a, b, dims, **kw)

    def attention_inputs(self, q, k, v, *, layer=None, rng=None):
        self.seen.append(("qkv", layer))
        return q, k, v

    def attention_output(self, out, *, layer=None, rng=None):
        self.seen.append(("attn", layer))
        return out


@pytest.mark.parametrize("parametrization", ["umup", "sp"])
def test_precision_hook_sees_every_matmul(parametrization):
    cfg = unn.TransformerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2,
                                scan_layers=False, parametrization=parametrization)
    model = unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 64)
    run = nnx.jit(lambda m: m(ids))
    base = run(model)
    policy = _RecordingPolicy()
    unn.set_precision(model, policy)
    chex.assert_trees_all_close(run(model), base, rtol=1e-6, atol=1e-6)
    roles = {"attn_qkv", "attn_out", "ffn_up", "ffn_gate", "ffn_down", "qkv", "attn"}
    assert set(policy.seen) == {(r, l) for r in roles for l in (0, 1)} | {("readout", None)}
    unn.set_precision(model, _RecordingPolicy(factor=0.5))
    assert not np.allclose(run(model), base, atol=1e-3)
    with pytest.raises(ValueError, match="lacks method"):
        unn.set_precision(model, object())
    with pytest.raises(ValueError, match="lacks method"):
        cfg.replace(precision="fp8")


@pytest.mark.parametrize("mult,use_where", [(1.0, False), (2.5, True)])
def test_parametrization_losses(mult, use_where):
    """u-muP's loss is ops.cross_entropy; SP's is the ordinary mean with its ordinary gradient
    (log_softmax written out here), whatever the u-muP multiplier."""
    logits = 3 * jax.random.normal(jax.random.key(0), (4, 9, 50))
    labels = jax.random.randint(jax.random.key(1), (4, 9), 0, 50)
    where = jax.random.bernoulli(jax.random.key(2), 0.5, (4, 9)) if use_where else None
    ours = jax.jit(jax.value_and_grad(
        lambda x: unn.UMuP().cross_entropy(x, labels, mult=mult, where=where)))(logits)
    ref = jax.jit(jax.value_and_grad(
        lambda x: ops.cross_entropy(x, labels, mult=mult, where=where)))(logits)
    chex.assert_trees_all_equal(ours, ref)
    w = jnp.ones((4, 9), bool) if where is None else where

    def mean_nll(x):
        nll = -jnp.take_along_axis(jax.nn.log_softmax(x), labels[..., None], -1)[..., 0]
        return jnp.sum(nll * w) / jnp.sum(w)

    for p in (unn.SP(), unn.MuP()):
        sp = jax.jit(jax.value_and_grad(
            lambda x: p.cross_entropy(x, labels, mult=mult, where=where)))(logits)
        chex.assert_trees_all_close(sp, jax.value_and_grad(mean_nll)(logits), rtol=1e-5, atol=1e-7)


def test_parametrization_objects():
    """Names map to objects (and objects pass through); modules hold the object."""
    assert unn.get_parametrization("umup") == unn.UMuP() and str(unn.SP()) == "sp"
    assert unn.get_parametrization(unn.MuP()) == unn.MuP()
    assert unn.UMuP().unit_scaled and not unn.SP().unit_scaled and not unn.MuP().unit_scaled
    with pytest.raises(ValueError, match="unknown parametrization 'spp'"):
        unn.get_parametrization("spp")
    cfg = unn.TransformerConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2,
                                parametrization="mup")
    assert (cfg.parametrization == unn.MuP()
            and cfg.replace(parametrization=unn.SP()).parametrization == unn.SP())
    model = unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))
    assert model.readout.parametrization == unn.MuP()
    assert model.stack.layers.mlp.up_proj.parametrization == unn.MuP()
    with pytest.raises(ValueError, match="parametrization must be one of"):
        cfg.replace(parametrization="standard")


def _vjp_both(f, g_f, args, seed=5):
    """Values and input gradients (for one random cotangent) of two functions, jitted."""
    def run(fn):
        y, vjp = jax.vjp(fn, *args)
        return y, vjp(jax.random.normal(jax.random.key(seed), y.shape, y.dtype))
    return jax.jit(lambda: run(f))(), jax.jit(lambda: run(g_f))()
