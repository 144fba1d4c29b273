"""Helpers for the optimizer tests: a tiny unit-scaled LM built by hand with umup_param."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import checks, ops
from unitscale_jax.nn import ParamInfo, param_info, umup_param
from unitscale_jax.optim import adam, umup_factors
from unitscale_jax.optim._tree import path_key


class TinyLM(nnx.Module):
    """Embedding -> depth x residual MLP (norm gain, hidden weights, bias) -> readout."""

    def __init__(self, vocab=32, d=16, hidden=24, depth=2, *, rngs: nnx.Rngs):
        self.depth = depth
        self.embed = umup_param(jax.random.normal(rngs.params(), (vocab, d)), "embedding", d)
        self.layers = nnx.List([_Block(d, hidden, depth, rngs) for _ in range(depth)])
        self.final_norm = umup_param(jnp.ones((d,)), "norm", d)
        self.readout = umup_param(jax.random.normal(rngs.params(), (d, vocab)), "output", d)

    def __call__(self, ids):
        x = ops.embedding(ids, self.embed[...])
        for i, layer in enumerate(self.layers):
            x = ops.residual_apply(layer, x, 1.0 / (1.0 + i) ** 0.5)
        x = ops.rms_norm(x, self.final_norm[...])
        return ops.linear_readout(x, self.readout[...])


class _Block(nnx.Module):
    def __init__(self, d, hidden, depth, rngs):
        self.norm = umup_param(jnp.ones((d,)), "norm", d, depth)
        self.up = umup_param(jax.random.normal(rngs.params(), (d, hidden)), "weight", d, depth)
        self.up_bias = umup_param(jnp.zeros((hidden,)), "bias", hidden, depth)
        self.down = umup_param(jax.random.normal(rngs.params(), (hidden, d)), "weight", hidden,
                               depth)

    def __call__(self, x):
        h = ops.linear(ops.rms_norm(x, self.norm[...]), self.up[...], self.up_bias[...])
        return ops.linear(ops.gelu(h), self.down[...])


#: The exact u-muP Adam factor of every TinyLM(d=16, hidden=24, depth=2) parameter.
TINY_ADAM_FACTORS = {
    ("embed",): 16 ** -0.5,
    ("final_norm",): 1.0,
    ("readout",): 1.0,
    **{("layers", str(i), "norm"): 2 ** -0.5 for i in range(2)},
    **{("layers", str(i), "up"): 2 ** -0.5 * 16 ** -0.5 for i in range(2)},
    **{("layers", str(i), "up_bias"): 2 ** -0.5 for i in range(2)},
    **{("layers", str(i), "down"): 2 ** -0.5 * 24 ** -0.5 for i in range(2)},
}


def lm_loss(model, ids):
    logits = model(ids[:, :-1])
    return ops.cross_entropy(logits, ids[:, 1:])


def random_grads(scales=(1e-3, 1.0, 1e4)):
    """Gradient-like dict of normal arrays with the given scales."""
    keys = jax.random.split(jax.random.key(0), len(scales))
    return {f"g{i}": s * jax.random.normal(k, (8, 5 + i))
            for i, (s, k) in enumerate(zip(scales, keys))}


def unit_scale_reference(grad_steps, decay):
    """numpy float64 reference: EMA of the mean square, bias-corrected."""
    ms, outs = {}, []
    for t, g in enumerate(grad_steps, start=1):
        out = {}
        for k, v in g.items():
            v = np.asarray(v, np.float64)
            ms[k] = decay * ms.get(k, 0.0) + (1 - decay) * np.mean(v * v)
            out[k] = v / np.sqrt(ms[k] / (1 - decay ** t))
        outs.append(out)
    return outs


# ---- exact u-muP factors of a model's parameters (test_model_factors_*.py) ------------------

FACTOR_HEADS = ("readout", "cls_head", "token_head")


def expected_umup_factor(key, shape, n_layers):
    """The u-muP Adam factor from a parameter's path and Flax shape alone (no metadata):
    embedding d_model^-1/2, heads and final norm 1, inside the stack kernel
    (n_layers fan_in)^-1/2 with fan_in = shape[-2] and bias / gain n_layers^-1/2."""
    if key[0] == "embed":
        return shape[-1] ** -0.5
    if key[0] in FACTOR_HEADS or key[0] == "final_norm":
        return 1.0
    assert key[0] == "stack", key
    depth = n_layers ** -0.5
    return depth * shape[-2] ** -0.5 if key[-1] == "kernel" else depth


def check_model_factors(model, loss, *, n_layers, use_model_grads, lr=0.5):
    """Checks every parameter's factor against ``expected_umup_factor``: in
    ``umup_factors(param_info(model))`` and in the first update of u-muP Adam (RMS = lr f)."""
    def flat(tree, is_leaf=None):
        leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
        return {path_key(p): v for p, v in leaves}

    params = nnx.as_pure(nnx.state(model, nnx.Param))
    want = {k: expected_umup_factor(k, v.shape, n_layers) for k, v in flat(params).items()}
    assert any(k[0] == "stack" and k[-1] == "kernel" for k in want)

    # 1. the metadata gives exactly these factors, for every parameter
    info = param_info(model)
    got = flat(umup_factors(info), is_leaf=lambda x: x is None)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-12), k

    # 2. they show in the first update of u-muP Adam (a sign step): RMS = lr * factor
    if use_model_grads:
        ids = jax.random.randint(jax.random.key(1), (4, 16), 0, 48)
        grads = nnx.as_pure(nnx.state(nnx.jit(nnx.grad(loss))(model, ids), nnx.Param))
    else:  # random gradients of the same layout (faster)
        leaves, treedef = jax.tree.flatten(params)
        keys = jax.random.split(jax.random.key(1), len(leaves))
        grads = treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
    # (betas with power-of-two complements make Adam's first step exactly sign(g))
    tx = adam(lr, param_info=info, eps=1e-30, b1=1 - 2 ** -3, b2=1 - 2 ** -10)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    checks.assert_umup_first_step(updates, info, lr, rtol=1e-6)
    for k, u in flat(updates).items():
        mags = np.abs(np.asarray(u))
        np.testing.assert_allclose(mags[mags > 0], np.float32(lr * want[k]), rtol=1e-6,
                                   err_msg=str(k))
        assert (mags > 0).mean() > (0.3 if k[0] == "embed" else 0.99), k


# ---- a toy parameter tree with one parameter of each u-muP type (optimizer / schedule tests) --

INFO = {"w": ParamInfo("weight", 16, 4), "e": ParamInfo("embedding", 9),
        "o": ParamInfo("output", 16), "b": ParamInfo("bias", 8), "n": ParamInfo("norm", 8, 4)}
FACTORS = {"w": 16 ** -0.5 / 2, "e": 1 / 3, "o": 1.0, "b": 1.0, "n": 0.5}
SHAPES = {"w": (16, 8), "e": (5, 9), "o": (16, 3), "b": (8,), "n": (8,)}


def toy_tree(seed, scale=1.0):
    """Normal arrays of ``SHAPES`` (times ``scale``), one key per leaf."""
    keys = dict(zip(SHAPES, jax.random.split(jax.random.key(seed), len(SHAPES))))
    return {k: scale * jax.random.normal(keys[k], s) for k, s in SHAPES.items()}
