"""unit_scale() composed with optax: chains, schedules, inject_hyperparams, MultiSteps, masked,
partition, and nnx.Optimizer on a plain Flax model."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from optim_helpers import random_grads as _grads
from optim_helpers import unit_scale_reference as _reference

from unitscale_jax import checks
from unitscale_jax.optim import unit_scale


def test_plain_flax_model_with_nnx_optimizer():
    """No u-muP metadata needed: unit_scale works on any model's nnx.State."""

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 32, rngs=rngs)
            self.norm = nnx.LayerNorm(32, rngs=rngs)
            self.l2 = nnx.Linear(32, 1, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.relu(self.norm(self.l1(x))))

    model = MLP(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    loss = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
    opt = nnx.Optimizer(model, optax.chain(unit_scale(decay=0.9), optax.adam(1e-2)), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        l, g = nnx.value_and_grad(loss)(model)
        opt.update(model, g)
        return l

    losses = [float(step(model, opt)) for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses
    assert opt.opt_state[0].rms.shape == (6,)  # 3 kernels/biases + LayerNorm scale and bias


def test_chain_with_schedule_matches_manual():
    g = _grads()
    sched = optax.linear_schedule(1.0, 0.5, 4)
    tx = optax.chain(unit_scale(), optax.sgd(sched))
    state = tx.init(g)
    for t in range(3):
        u, state = tx.update(g, state)
        normed, _ = unit_scale().update(g, unit_scale().init(g))
        chex.assert_trees_all_close(u, jax.tree.map(lambda x: -float(sched(t)) * x, normed),
                                    rtol=1e-6)


def test_inject_hyperparams_can_change_decay():
    g = _grads()
    tx = optax.inject_hyperparams(unit_scale)(decay=0.0)
    state = tx.init(g)
    u, state = tx.update(g, state)
    state.hyperparams["decay"] = jnp.asarray(0.5)
    u2, state = tx.update(jax.tree.map(lambda x: 2 * x, g), state)
    # step 2 with decay 0.5: ms_hat = (0.5 * 0.5 * ms + 0.5 * 4 ms) / 0.75 = 3 ms
    # -> out = 2g / sqrt(3 ms)
    ref = _reference([g, jax.tree.map(lambda x: 2 * x, g)], 0.5)[1]
    chex.assert_trees_all_close(u2, ref, rtol=2e-6)


def test_multisteps_normalises_the_accumulated_gradient():
    g1, g2 = _grads(), _grads((5.0, 5.0, 5.0))
    tx = optax.MultiSteps(unit_scale(), every_k_schedule=2)
    state = tx.init(g1)
    u, state = tx.update(g1, state)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, g1))
    u, state = tx.update(g2, state)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    ref, _ = unit_scale().update(mean, unit_scale().init(mean))
    chex.assert_trees_all_close(u, ref, rtol=1e-6)


def test_masked_and_partition():
    g = _grads()
    mask = {"g0": True, "g1": False, "g2": True}
    u, _ = optax.masked(unit_scale(), mask).update(g, optax.masked(unit_scale(), mask).init(g))
    np.testing.assert_array_equal(u["g1"], g["g1"])
    checks.assert_unit_rms({"g0": u["g0"], "g2": u["g2"]})

    tx = optax.partition({"us": unit_scale(), "id": optax.identity()},
                         {"g0": "us", "g1": "id", "g2": "us"})
    state = tx.init(g)
    u, state = tx.update(g, state)
    np.testing.assert_array_equal(u["g1"], g["g1"])
    checks.assert_unit_rms({"g0": u["g0"], "g2": u["g2"]})
    assert state.inner_states["us"].inner_state.rms.shape == (2,)  # g0 and g2 only
