"""Layers of unitscale_jax.nn: unit scale, parametrization switch, metadata, hooks, residuals."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import ops
from unitscale_jax import nn as unn
from unitscale_jax.nn import _maths, _residual
from unitscale_jax.nn.params import ParamInfo


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
    chex.assert_trees_all_close(y, ops.linear(x, layer.kernel[...], constraint=constraint), rtol=1e-6)
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
            lambda x, w: _maths.readout(x, w, b, layer.parametrization) if layer.readout
            else _maths.linear(x, w, b, layer.parametrization),
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
    dot = jax.jit(lambda a, b: jnp.sum(unn.rope(q, jnp.array([[a]])) * unn.rope(k, jnp.array([[b]]))))
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
def test_traced_tau_residual_matches_ops(tau):
    x = jax.random.normal(jax.random.key(0), (4, 16))
    w = jax.random.normal(jax.random.key(1), (16, 16))

    def block(split, add, tau_):
        def f(x, w):
            r, s = split(x, tau_)
            return jnp.sum(add(ops.linear(r, w), s, tau_) * jnp.arange(16.0))
        return jax.value_and_grad(f, argnums=(0, 1))(x, w)

    ref = jax.jit(lambda: block(ops.residual_split, ops.residual_add, tau))()
    static = jax.jit(lambda: block(_residual.residual_split, _residual.residual_add, tau))()
    traced = jax.jit(lambda t: block(_residual.residual_split, _residual.residual_add, t))(jnp.float32(tau))
    chex.assert_trees_all_close(static, ref, rtol=1e-5)
    chex.assert_trees_all_close(traced, ref, rtol=1e-5)


def test_branch_taus():
    rule = ops.transformer_residual_scaling_rule(0.5, 2.0)
    taus = unn.branch_taus(("attn", "mlp") * 3, 0.5, 2.0)
    assert taus == tuple(rule(i, 6) for i in range(6))
    # cross-attention stacks: tau_i = alpha_i / sqrt(n_layers + sum_{j<i} alpha_j^2)
    t = unn.branch_taus(("attn", "attn", "mlp") * 2)
    np.testing.assert_allclose(t, [1 / 2 ** 0.5, 1 / 3 ** 0.5, 1 / 2, 1 / 5 ** 0.5, 1 / 6 ** 0.5, 1 / 7 ** 0.5])
    with pytest.raises(ValueError, match="branch kinds"):
        unn.branch_taus(("attn", "ffn"))


@dataclasses.dataclass(frozen=True)
class _RecordingPolicy:
    """Records the roles it is called with (at trace time) and scales outputs by ``factor``."""

    factor: float = 1.0
    seen: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def linear(self, x, kernel, bias=None, *, role, layer=None, constraint=None, rng=None):
        self.seen.append((role, layer))
        op = ops.linear_readout if role == "readout" else ops.linear
        return self.factor * op(x, kernel, bias, constraint=constraint)

    def dot(self, x, w, role, *, layer=None, rng=None):
        self.seen.append((role, layer))
        return self.factor * (x @ w)

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
def test_model_loss_equals_ops_cross_entropy(mult, use_where):
    logits = 3 * jax.random.normal(jax.random.key(0), (4, 9, 50))
    labels = jax.random.randint(jax.random.key(1), (4, 9), 0, 50)
    where = jax.random.bernoulli(jax.random.key(2), 0.5, (4, 9)) if use_where else None
    ours = jax.jit(jax.value_and_grad(
        lambda x: _maths.cross_entropy(x, labels, "umup", mult=mult, where=where)))(logits)
    ref = jax.jit(jax.value_and_grad(
        lambda x: ops.cross_entropy(x, labels, mult=mult, where=where)))(logits)
    chex.assert_trees_all_close(ours, ref, rtol=1e-5, atol=1e-6)
    sp = jax.jit(jax.value_and_grad(lambda x: _maths.cross_entropy(x, labels, "sp", mult=mult, where=where)))(logits)
    w = jnp.ones((4, 9), bool) if where is None else where
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(sp[0], jnp.sum(nll * w) / jnp.sum(w), rtol=1e-5)


def _vjp_both(f, g_f, args, seed=5):
    """Values and input gradients (for one random cotangent) of two functions, jitted."""
    def run(fn):
        y, vjp = jax.vjp(fn, *args)
        return y, vjp(jax.random.normal(jax.random.key(seed), y.shape, y.dtype))
    return jax.jit(lambda: run(f))(), jax.jit(lambda: run(g_f))()


@pytest.mark.parametrize("case", ["linear", "linear_none", "linear_bias", "readout", "glu",
                                  "glu_mult", "gelu", "gelu_mult", "attn_causal", "attn_mask"])
def test_fused_forms_equal_the_ops(case):
    from unitscale_jax.nn import _fused

    k = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(k[0], (4, 8, 32))
    w = jax.random.normal(k[1], (32, 48))
    b = jax.random.normal(k[2], (48,))
    q, kk, v = (jax.random.normal(k[i], (2, 7, 3, 16)) for i in (3, 4, 5))
    mask = jax.random.bernoulli(k[2], 0.7, (2, 1, 7, 7)) | jnp.eye(7, dtype=bool)
    cases = {
        "linear": (lambda x, w: _fused.linear(x, w, None, "to_output_scale"),
                   lambda x, w: ops.linear(x, w), (x, w)),
        "linear_none": (lambda x, w: _fused.linear(x, w, None, None),
                        lambda x, w: ops.linear(x, w, constraint=None), (x, w)),
        "linear_bias": (lambda x, w, b: _fused.linear(x, w, b, "to_output_scale"),
                        lambda x, w, b: ops.linear(x, w, b), (x, w, b)),
        "readout": (lambda x, w, b: _fused.linear(x, w, b, None, readout=True),
                    lambda x, w, b: ops.linear_readout(x, w, b), (x, w, b)),
        "glu": (lambda a, g: _fused.silu_glu(a, g, 1.0), lambda a, g: ops.silu_glu(a, g), (x, 2 * x[::-1])),
        "glu_mult": (lambda a, g: _fused.silu_glu(a, g, 2.5),
                     lambda a, g: ops.silu_glu(a, g, mult=2.5), (x, 2 * x[::-1])),
        "gelu": (lambda a: _fused.gelu(a, 1.0), lambda a: ops.gelu(a), (x,)),
        "gelu_mult": (lambda a: _fused.gelu(a, 0.3), lambda a: ops.gelu(a, mult=0.3), (x,)),
        "attn_causal": (lambda q, k, v: _fused.attention(q, k, v, mask=None, is_causal=True, mult=1.5,
                                                         dropout_rate=0.0, rng=None, scale_seq_len=None,
                                                         scale_is_causal=None),
                        lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True, mult=1.5),
                        (q, kk, v)),
        "attn_mask": (lambda q, k, v: _fused.attention(q, k, v, mask=mask, is_causal=False, mult=1.0,
                                                       dropout_rate=0.0, rng=None, scale_seq_len=20,
                                                       scale_is_causal=True),
                      lambda q, k, v: ops.scaled_dot_product_attention(
                          q, k, v, mask=mask, scale_seq_len=20, scale_is_causal=True),
                      (q, kk, v)),
    }
    fused, op, args = cases[case]
    (y1, g1), (y2, g2) = _vjp_both(fused, op, args)
    chex.assert_trees_all_close(y1, y2, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g1, g2, rtol=1e-5, atol=1e-5)
