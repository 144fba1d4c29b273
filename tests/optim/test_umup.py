"""scale_by_umup: exact per-parameter factors, tree-path matching, missing-metadata errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optim_helpers import TINY_ADAM_FACTORS, TinyLM

from unitscale_jax import checks
from unitscale_jax.nn import ParamInfo, param_info
from unitscale_jax.optim import adam, scale_by_umup, umup_factor
from unitscale_jax.optim._tree import path_key


def _flat(tree):
    flat, _ = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, nnx.Variable))
    return {path_key(p): getattr(x, "get_value", lambda: x)() for p, x in flat}


def _ones_like(params):
    return jax.tree.map(jnp.ones_like, params)


def test_factor_table():
    assert umup_factor(ParamInfo("weight", 256)) == 256 ** -0.5
    assert umup_factor(ParamInfo("weight", 256, depth=4)) == 256 ** -0.5 * 0.5
    assert umup_factor(ParamInfo("embedding", 64)) == 64 ** -0.5
    assert umup_factor(ParamInfo("output", 64)) == 1.0
    assert umup_factor(ParamInfo("output", 64, 9)) == 1 / 3
    assert umup_factor(ParamInfo("bias", 64)) == 1.0
    assert umup_factor(ParamInfo("norm", 64, 16)) == 0.25
    # SGD with the default unconstrained readout: Adam's factors
    for t in ("weight", "embedding", "output", "bias", "norm"):
        i = ParamInfo(t, 100, 4)
        assert umup_factor(i, "sgd") == umup_factor(i, "adam")
    # SGD with a to_output_scale readout: the reference's lr_scale_func_sgd
    assert umup_factor(ParamInfo("weight", 100, 4), "sgd", "to_output_scale") == 10.0 * 0.5
    assert umup_factor(ParamInfo("embedding", 64), "sgd", "to_output_scale") == 8.0
    assert umup_factor(ParamInfo("bias", 48), "sgd", "to_output_scale") == 48.0
    assert umup_factor(ParamInfo("norm", 48, 4), "sgd", "to_output_scale") == 24.0
    assert umup_factor(ParamInfo("output", 48, 4), "sgd", "to_output_scale") == 0.5
    with pytest.raises(ValueError, match="optimizer must be one of"):
        umup_factor(ParamInfo("weight", 4), "lion")
    with pytest.raises(ValueError, match="readout_constraint must be one of"):
        umup_factor(ParamInfo("weight", 4), "sgd", "gmean")


@pytest.mark.parametrize("as_variables", [False, True])
def test_exact_factors_for_every_parameter_of_hand_built_model(as_variables):
    model = TinyLM(rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    if not as_variables:
        params = nnx.as_pure(params)
    tx = scale_by_umup(param_info(model))
    u, _ = tx.update(_ones_like(params), tx.init(params))
    if as_variables:
        assert all(isinstance(v, nnx.Param) for v in jax.tree.leaves(
            u, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    got = {k: float(v.reshape(-1)[0]) for k, v in _flat(u).items()}
    assert got.keys() == TINY_ADAM_FACTORS.keys()
    for k, want in TINY_ADAM_FACTORS.items():
        assert got[k] == np.float32(want), k
        assert np.all(np.asarray(_flat(u)[k]) == np.float32(want))


def test_matching_by_path_is_robust():
    model = TinyLM(rngs=nnx.Rngs(0))
    info = param_info(model)
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    as_dict = pure.to_pure_dict()                    # int keys for the layer list
    nested = {"params": as_dict}                     # one level deeper than param_info
    for tree in (as_dict, nested):
        tx = scale_by_umup(info)
        u, _ = tx.update(_ones_like(tree), tx.init(tree))
        got = {k[-3:] if k[0] == "params" and len(k) > 3 else k[1:] if k[0] == "params" else k:
               float(v.reshape(-1)[0]) for k, v in _flat(u).items()}
        assert got == {k: float(np.float32(v)) for k, v in TINY_ADAM_FACTORS.items()}
    # the model itself is accepted in place of param_info
    u, _ = scale_by_umup(model).update(_ones_like(pure), optax.EmptyState())
    assert float(_flat(u)[("embed",)][0, 0]) == np.float32(16 ** -0.5)


def test_none_and_masked_leaves_pass_through():
    info = {"w": ParamInfo("weight", 4), "b": ParamInfo("bias", 3)}
    u = {"w": jnp.ones((4, 3)), "b": optax.MaskedNode(), "c": None}
    out, _ = scale_by_umup(info).update(u, optax.EmptyState())
    np.testing.assert_array_equal(out["w"], 0.5)
    assert isinstance(out["b"], optax.MaskedNode) and out["c"] is None


def test_missing_metadata_is_an_error_naming_the_parameters():
    class Plain(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
            self.w = nnx.Param(jnp.ones((3, 3)))

    model = Plain()
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    info = param_info(model, allow_missing=True)
    with pytest.raises(ValueError, match=r"dense/bias, dense/kernel, w.*default=ParamInfo"):
        scale_by_umup(info).init(params)
    with pytest.raises(ValueError, match="dense/kernel"):
        scale_by_umup(info).update(params, optax.EmptyState())
    # a parameter the info tree does not know at all
    with pytest.raises(ValueError, match="extra"):
        scale_by_umup({"w": ParamInfo("weight", 9)}).init({"w": jnp.ones(2), "extra": jnp.ones(2)})
    # opt-ins
    u, _ = scale_by_umup(info, default=ParamInfo("weight", 16)).update(
        _ones_like(params), optax.EmptyState())
    assert all(np.all(np.asarray(v) == 0.25) for v in jax.tree.leaves(u))
    u, _ = scale_by_umup(info, allow_missing=True).update(_ones_like(params), optax.EmptyState())
    assert all(np.all(np.asarray(v) == 1.0) for v in jax.tree.leaves(u))
    with pytest.raises(TypeError, match="expected ParamInfo"):
        scale_by_umup({"w": 3.0})


def test_sgd_rules_applied_to_updates():
    info = {"w": ParamInfo("weight", 16, 4), "b": ParamInfo("bias", 8),
            "o": ParamInfo("output", 16)}
    u = {"w": jnp.ones((16, 8)), "b": jnp.ones((8,)), "o": jnp.ones((16, 2))}
    out, _ = scale_by_umup(info, optimizer="sgd").update(u, optax.EmptyState())
    chex.assert_trees_all_equal(out, {"w": u["w"] / 8, "b": u["b"], "o": u["o"]})
    out, _ = scale_by_umup(info, optimizer="sgd", readout_constraint="to_output_scale").update(
        u, optax.EmptyState())
    chex.assert_trees_all_equal(out, {"w": u["w"] * 2, "b": u["b"] * 8, "o": u["o"]})


def test_first_step_rms_is_lr_times_factor(tiny_grads):
    params, grads, info = tiny_grads
    lr = 0.37
    tx = adam(lr, param_info=info, eps=1e-30)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    checks.assert_umup_first_step(u, info, lr)
    got = {k: float(checks.nonzero_rms(v)) for k, v in _flat(u).items()}
    for k, f in TINY_ADAM_FACTORS.items():
        np.testing.assert_allclose(got[k], lr * f, rtol=2e-5, err_msg=str(k))
    with pytest.raises(AssertionError):  # default betas: (1 - 7e-6) sign(g), not exact
        checks.assert_umup_first_step(u, info, lr, rtol=1e-6)
    tx = adam(lr, param_info=info, eps=1e-30, b1=1 - 2 ** -3, b2=1 - 2 ** -10)
    u_exact, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    checks.assert_umup_first_step(u_exact, info, lr, rtol=1e-6)
    assert float(jnp.mean(_flat(u)[("embed",)] == 0)) > 0.2  # rows of absent tokens: no update
    with pytest.raises(AssertionError):
        checks.assert_umup_first_step(u, info, 2 * lr)
    with pytest.raises(AssertionError):
        checks.assert_umup_first_step(u, info, lr, optimizer="sgd",
                                      readout_constraint="to_output_scale")


def test_depth_exponent_factor():
    """The depth factor is depth^(a - 1): u-muP's depth^-1/2 at a = 1/2, none at CompleteP's 1."""
    for depth in (1, 4, 16):
        base = umup_factor(ParamInfo("weight", 256))
        assert umup_factor(ParamInfo("weight", 256, depth, 0.5)) == base * depth ** -0.5
        assert umup_factor(ParamInfo("weight", 256, depth, 1.0)) == base
        assert umup_factor(ParamInfo("norm", 64, depth, 0.75)) == depth ** -0.25
        assert umup_factor(ParamInfo("weight", 100, depth, 1.0), "sgd",
                           "to_output_scale") == 10.0
    with pytest.raises(ValueError, match=r"depth_exponent must be in \[0.5, 1\]"):
        ParamInfo("weight", 4, 2, 0.2)
