"""unit_scale(): RMS-1 outputs, exact loss-scale invariance, pass-through leaves, composition."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optim_helpers import lm_loss
from optim_helpers import random_grads as _grads
from optim_helpers import unit_scale_reference as _reference

from unitscale_jax import checks
from unitscale_jax.optim import UnitScaleState, unit_scale


def test_step_one_output_has_rms_exactly_one():
    txs = [unit_scale(decay=d) for d in (0.0, 0.9, 0.999)]
    step = jax.jit(lambda g: [tx.update(g, tx.init(g)) for tx in txs])
    for u, state in step(_grads()):
        checks.assert_unit_rms(u, rtol=2e-7)
        assert isinstance(state, UnitScaleState) and int(state.count) == 1


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9])
def test_matches_float64_reference_over_steps(decay):
    steps = [_grads((10.0 ** -t, 2.0 ** t, 3.0)) for t in range(5)]
    tx = unit_scale(decay=decay)
    state, update = tx.init(steps[0]), jax.jit(tx.update)
    for g, ref in zip(steps, _reference(steps, decay)):
        u, state = update(g, state)
        chex.assert_trees_all_close(u, ref, rtol=2e-6)
        if decay == 0.0:
            checks.assert_unit_rms(u)
    chex.assert_shape(state.rms, (len(steps[0]),))
    assert state.rms.dtype == jnp.float32


def test_later_steps_rms_within_tolerance_for_slow_drift():
    tx = unit_scale(decay=0.9)
    g = _grads()
    state, update = tx.init(g), jax.jit(tx.update)
    for t in range(20):  # gradients shrink 1% per step
        u, state = update(jax.tree.map(lambda x: x * 0.99 ** t, g), state)
        checks.assert_unit_rms(u, rtol=0.3)
    with pytest.raises(AssertionError):
        checks.assert_unit_rms(u)  # not exact any more: the estimate lags the drift


def test_zero_leaves_stay_zero_and_none_masked_pass_through():
    g = {"a": jnp.zeros((3, 4)), "b": jnp.ones((2,)) * 1e-3, "c": None, "d": optax.MaskedNode()}
    tx = unit_scale(decay=0.9)
    state = tx.init(g)
    assert state.rms.shape == (2,)  # one scalar per array leaf: None / MaskedNode hold no state
    for _ in range(3):
        u, state = tx.update(g, state)
        np.testing.assert_array_equal(u["a"], 0.0)
        np.testing.assert_allclose(u["b"], 1.0, rtol=1e-6)
        assert u["c"] is None and isinstance(u["d"], optax.MaskedNode)
    # a leaf that becomes zero after being non-zero also stays zero (estimate > 0, 0 / r = 0)
    u, state = tx.update({**g, "b": jnp.zeros((2,))}, state)
    np.testing.assert_array_equal(u["b"], 0.0)


@pytest.mark.parametrize("decay", [0.0, 0.99])
def test_loss_scale_invariance_is_bit_exact(decay):
    # gradients spanning 1e-30 .. 1e30: naive mean squares would underflow/overflow fp32
    g = _grads((1e-30, 1e-12, 1.0, 1e15, 1e30))
    params = jax.tree.map(jnp.zeros_like, g)
    checks.assert_loss_scale_invariant(unit_scale(decay=decay), g, params, num_steps=2, rtol=0.0)
    # and the RMS is right at these extremes
    u, _ = unit_scale().update(g, unit_scale().init(g))
    checks.assert_unit_rms(u)


def test_sudden_jumps_in_gradient_scale_keep_exact_normalisation_and_invariance():
    # from step 2 the mean square is taken in one pass, normalised by the previous RMS; a jump
    # of 2^40 between steps (or a leaf going to zero and back) takes the exact two-pass path
    base = _grads((1e-3, 1.0, 1e4))
    steps = [jax.tree.map(lambda x, f=f: x * f, base)
             for f in (1.0, 1.5, 2.0 ** 40, 2.0 ** -40, 0.0, 1.0)]
    tx = unit_scale()
    state, update = tx.init(base), jax.jit(tx.update)
    for t, g in enumerate(steps):
        u, state = update(g, state)
        if t == 4:
            jax.tree.map(lambda x: np.testing.assert_array_equal(x, 0.0), u)
        else:
            checks.assert_unit_rms(u, rtol=1e-6)
    params = jax.tree.map(jnp.zeros_like, base)
    checks.assert_loss_scale_invariant(tx, steps, params, num_steps=len(steps), rtol=0.0)


def test_loss_scale_invariance_with_real_scaled_loss(tiny_lm, tiny_batch):
    """Gradients of 2^k * loss (autodiff, not synthetic) give identical unit-scaled updates."""
    tx = unit_scale()

    @nnx.jit
    def scaled_step(model, scale, ids):
        grads = nnx.grad(lambda m: scale * lm_loss(m, ids))(model)
        grads = nnx.as_pure(nnx.state(grads, nnx.Param))
        return tx.update(grads, tx.init(grads))[0]

    outs = [scaled_step(tiny_lm, jnp.float32(2.0 ** k), tiny_batch) for k in (-20, -7, 0, 11, 20)]
    for o in outs[1:]:
        chex.assert_trees_all_equal(o, outs[0])


def test_positive_eps_trades_invariance_for_bounded_amplification():
    g = {"tiny": jnp.full((4,), 1e-12), "big": jnp.full((4,), 1.0)}
    u, _ = unit_scale(eps=1e-6).update(g, unit_scale(eps=1e-6).init(g))
    assert float(jnp.max(u["tiny"])) < 1e-5
    np.testing.assert_allclose(u["big"], 1.0 / (1.0 + 1e-6), rtol=1e-7)


def test_dtype_preserved_and_finite():
    g = {"h": jnp.full((4, 4), 3e-3, jnp.bfloat16), "f": jnp.arange(6.0)}
    tx = unit_scale()
    u, _ = tx.update(g, tx.init(g))
    assert u["h"].dtype == jnp.bfloat16 and u["f"].dtype == jnp.float32
    checks.assert_finite_updates(g, u)
    checks.assert_unit_rms(u, rtol=1e-2)


def test_nan_gradients_propagate_and_finite_check_skips_them():
    g = {"a": jnp.array([1.0, jnp.nan])}
    u, _ = unit_scale().update(g, unit_scale().init(g))
    assert not bool(jnp.all(jnp.isfinite(u["a"])))
    checks.assert_finite_updates(g, u)  # grads not finite: nothing is claimed


def test_invalid_decay_and_mismatched_tree_are_clear_errors():
    with pytest.raises(ValueError, match="decay must be in"):
        unit_scale(decay=1.0)
    g = _grads()
    with pytest.raises(ValueError, match="initialised for 3"):
        unit_scale().update({"only": jnp.ones(3)}, unit_scale().init(g))


def test_state_is_recognised_as_non_parameter_state_by_optax():
    """optax.tree.map_params (used to derive optimizer-state shardings) must not mistake the
    per-leaf scalars for a parameter tree."""
    g = _grads()
    tx = optax.chain(unit_scale(), optax.adam(1.0))
    specs = optax.tree.map_params(tx, lambda _, s: s, tx.init(g), jax.tree.map(lambda x: "P", g),
                                  transform_non_params=lambda _: "R")
    assert specs[0].rms == "R" and specs[1][0].mu == {"g0": "P", "g1": "P", "g2": "P"}


def test_works_on_nnx_state_of_variables(tiny_lm, tiny_batch):
    params = nnx.state(tiny_lm, nnx.Param)          # leaves are nnx.Param wrappers
    grads = nnx.jit(nnx.grad(lm_loss))(tiny_lm, tiny_batch)
    tx = unit_scale()
    u, _ = jax.jit(tx.update)(nnx.state(grads, nnx.Param), tx.init(params))
    leaves = jax.tree.leaves(u, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert len(leaves) == 11 and all(isinstance(v, nnx.Param) for v in leaves)
    assert leaves[0].get_metadata() == jax.tree.leaves(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0].get_metadata()
    checks.assert_unit_rms(u)


def test_under_jit_with_chexify():
    g = _grads()
    tx = unit_scale(decay=0.9)

    @chex.chexify
    @jax.jit
    def step(g, state):
        u, state = tx.update(g, state)
        checks.assert_unit_rms(u)
        checks.assert_finite_updates(g, u)
        return u, state

    u, state = step(g, tx.init(g))
    chex.block_until_chexify_assertions_complete()
    bad = chex.chexify(jax.jit(checks.assert_unit_rms), async_check=False)
    with pytest.raises(AssertionError, match="assert_trees_all_close"):
        bad({"x": jnp.full((3,), 2.0)})
