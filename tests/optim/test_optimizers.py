"""u-muP adam / adamw / sgd chains, independent weight decay, inject_hyperparams, loss-scale
invariance, training through nnx.Optimizer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optim_helpers import FACTORS, INFO, TinyLM, lm_loss
from optim_helpers import toy_tree as _tree

from unitscale_jax import checks
from unitscale_jax.nn import param_info
from unitscale_jax.optim import (
    adam,
    adamw,
    exponential_decay,
    sgd,
    unit_scale,
    warmup_cosine,
)


def test_adamw_equals_manual_formula_over_steps():
    lr, wd = optax.linear_schedule(0.5, 0.1, 5), 0.05
    tx = adamw(lr, param_info=INFO, weight_decay=wd, b1=0.8, b2=0.9, eps=1e-6,
               peak_learning_rate=0.5)  # a plain optax schedule: its peak is given
    ref_adam = optax.scale_by_adam(b1=0.8, b2=0.9, eps=1e-6)
    params = _tree(0)
    state, ref_state = tx.init(params), ref_adam.init(params)
    for t in range(4):
        g = _tree(10 + t)
        u, state = tx.update(g, state, params)
        a, ref_state = ref_adam.update(g, ref_state)
        decayed = {"w", "e", "o"}
        want = {k: -float(lr(t)) * (FACTORS[k] * a[k]
                                    + (wd / 0.5 if k in decayed else 0) * params[k])
                for k in params}
        chex.assert_trees_all_close(u, want, rtol=1e-6, atol=1e-7)
        params = optax.apply_updates(params, u)


def test_independent_decay_follows_schedule_not_peak_or_factor():
    """With zero gradients the update is pure decay:
    theta <- theta (1 - lambda eta_t / eta_peak)."""
    params = _tree(0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    for peak in (1e-3, 1.0, 64.0):
        sched = warmup_cosine(peak, warmup_steps=2, total_steps=6)
        tx = adamw(sched, param_info=INFO, weight_decay=0.1)
        state, p = tx.init(params), params
        for t in range(6):
            new_p = optax.apply_updates(p, tx.update(zeros, state, p)[0])
            state = tx.update(zeros, state, p)[1]
            ratio = float(sched(t)) / peak
            for k in ("w", "e", "o"):
                np.testing.assert_allclose(new_p[k], p[k] * (1 - 0.1 * ratio), rtol=1e-6)
            for k in ("b", "n"):  # biases and gains are not decayed by default
                np.testing.assert_array_equal(new_p[k], p[k])
            p = new_p


def test_weight_decay_types_and_mask():
    params = _tree(0)
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = adamw(1.0, param_info=INFO, weight_decay=0.5, weight_decay_types=("norm",))
    u, _ = tx.update(zeros, tx.init(params), params)
    assert all(float(jnp.abs(u[k]).max()) == 0 for k in ("w", "e", "o", "b"))
    np.testing.assert_allclose(u["n"], -0.5 * params["n"])
    mask = {"w": False, "e": True, "o": False, "b": True, "n": True}
    tx = adamw(1.0, param_info=INFO, weight_decay=0.5, weight_decay_mask=mask)
    u, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_allclose(u["e"], -0.5 * params["e"])
    assert all(float(jnp.abs(u[k]).max()) == 0 for k in ("w", "o", "b", "n"))
    with pytest.raises(ValueError, match="decay_types must be drawn from"):
        adamw(1.0, param_info=INFO, weight_decay_types=("kernel",))
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(zeros, tx.init(params))


def test_sgd_chain_with_momentum_and_rules():
    params = _tree(0)
    for rc, factors in ((None, FACTORS),
                        ("to_output_scale",
                         {"w": 4.0 / 2, "e": 3.0, "o": 1.0, "b": 8.0, "n": 4.0})):
        tx = sgd(0.1, param_info=INFO, momentum=0.9, readout_constraint=rc)
        state, trace = tx.init(params), jax.tree.map(jnp.zeros_like, params)
        for t in range(3):
            g = _tree(20 + t)
            u, state = tx.update(g, state, params)
            trace = jax.tree.map(lambda m, x: 0.9 * m + x, trace, g)
            chex.assert_trees_all_close(u, {k: -0.1 * factors[k] * trace[k] for k in g}, rtol=1e-6)


@pytest.mark.parametrize("make", [
    lambda lr: adamw(lr, param_info=INFO, weight_decay=0.1, peak_learning_rate=1.0),
    lambda lr: sgd(lr, param_info=INFO, momentum=0.5, weight_decay=0.1, peak_learning_rate=1.0),
])
def test_inject_hyperparams_changes_learning_rate_mid_run(make):
    params, g = _tree(0), _tree(1)
    tx = optax.inject_hyperparams(make)(lr=1.0)
    ref = make(1.0)
    state, ref_state = tx.init(params), ref.init(params)
    update = jax.jit(tx.update)
    u, state = update(g, state, params)
    r, ref_state = ref.update(g, ref_state, params)
    chex.assert_trees_all_close(u, r, rtol=1e-6, atol=1e-7)
    state.hyperparams["lr"] = jnp.asarray(0.25)
    u, state = update(g, state, params)
    r, ref_state = ref.update(g, ref_state, params)
    chex.assert_trees_all_close(u, jax.tree.map(lambda x: 0.25 * x, r), rtol=1e-6, atol=1e-7)


def test_inject_hyperparams_by_name_and_scheduled():
    params, g = _tree(0), _tree(1)
    tx = optax.inject_hyperparams(adamw)(learning_rate=0.5, param_info=INFO, weight_decay=0.0)
    state = tx.init(params)
    u1, state = tx.update(g, state, params)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    u2, state = tx.update(g, state, params)
    # same gradient twice: Adam's output is sign(g) both times, so only the lr differs
    chex.assert_trees_all_close(u2, jax.tree.map(lambda x: 0.1 * x, u1), rtol=1e-5)
    # a schedule given to inject_hyperparams is evaluated by it at each step
    tx = optax.inject_hyperparams(adamw)(
        learning_rate=exponential_decay(1.0, 0.5), param_info=INFO, weight_decay=0.0)
    state = tx.init(params)
    for t in range(3):  # u1 was taken at lr 0.5
        u, state = tx.update(g, state, params)
        chex.assert_trees_all_close(u, jax.tree.map(lambda x: 0.5 ** t / 0.5 * x, u1), rtol=1e-5)


def test_loss_scale_invariance_of_umup_optimizers(tiny_grads):
    params, grads, info = tiny_grads
    # u-muP Adam alone: invariant when eps is far below the (scaled) gradients
    checks.assert_loss_scale_invariant(adam(0.1, param_info=info, eps=1e-30), grads, params,
                                       num_steps=2, rtol=1e-6)
    # behind unit_scale(): bit-for-bit, for every optimizer, default eps and weight decay
    for tx in (adamw(0.1, param_info=info, weight_decay=0.1),
               sgd(0.1, param_info=info, momentum=0.9)):
        checks.assert_loss_scale_invariant(optax.chain(unit_scale(), tx), grads, params,
                                           num_steps=2, rtol=0.0)
    # plain u-muP SGD is not (its step is proportional to the gradient): the check must fail
    with pytest.raises(AssertionError):
        checks.assert_loss_scale_invariant(sgd(0.1, param_info=info), grads, params,
                                           exponents=(-3, 0, 3))


def test_finite_updates_and_nnx_optimizer_training():
    model = TinyLM(rngs=nnx.Rngs(0))
    ids = jax.random.randint(jax.random.key(3), (8, 17), 0, 32)
    opt = nnx.Optimizer(model, adamw(0.05, param_info=param_info(model), weight_decay=1e-3),
                        wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, ids):
        loss, grads = nnx.value_and_grad(lm_loss)(model, ids)
        updates = opt.update(model, grads)
        return loss, grads, updates

    losses = []
    for _ in range(10):
        loss, grads, updates = step(model, opt, ids)
        checks.assert_finite_updates(grads, updates)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.3, losses
