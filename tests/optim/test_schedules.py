"""Schedules with the u-muP optimizers: warmup-cosine, exponential decay, reduce-on-plateau,
and the peak learning rate of the independent weight decay."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optim_helpers import FACTORS, INFO
from optim_helpers import toy_tree as _tree

from unitscale_jax.optim import (
    adam,
    adamw,
    exponential_decay,
    reduce_on_plateau,
    resolve_peak_learning_rate,
    warmup_cosine,
)


def test_peak_learning_rate_resolution():
    assert resolve_peak_learning_rate(0.3) == 0.3
    assert resolve_peak_learning_rate(0.3, 0.5) == 0.5
    assert resolve_peak_learning_rate(warmup_cosine(2.0, 10, 100)) == 2.0
    assert resolve_peak_learning_rate(exponential_decay(0.7, 0.9)) == 0.7
    # a plain optax schedule: the peak is given, never probed
    sched = optax.warmup_cosine_decay_schedule(0.0, 1.5, 300_000, 900_000)
    assert resolve_peak_learning_rate(sched, 1.5) == 1.5
    with pytest.raises(ValueError, match="pass peak_learning_rate"):
        resolve_peak_learning_rate(sched)
    with pytest.raises(ValueError, match="must be > 0"):
        resolve_peak_learning_rate(optax.constant_schedule(0.0), 0.0)


@pytest.mark.parametrize("sched", [warmup_cosine(1.0, 3, 8, init_value=0.1, end_value=0.05),
                                   exponential_decay(2.0, 0.7)])
def test_schedules_drive_umup_adam(sched):
    """Constant gradient: Adam gives sign(g) every step, so updates are -eta_t f sign(g)."""
    params, g = _tree(0), _tree(1)
    tx = adam(sched, param_info=INFO)
    state, update = tx.init(params), jax.jit(tx.update)
    for t in range(8):
        u, state = update(g, state, params)
        want = {k: -float(sched(t)) * FACTORS[k] * jnp.sign(g[k]) for k in g}
        chex.assert_trees_all_close(u, want, rtol=2e-5)


def test_schedule_values():
    s = warmup_cosine(1.0, 4, 12, init_value=0.2, end_value=0.1)
    np.testing.assert_allclose([s(t) for t in (0, 2, 4, 8, 12, 20)],
                               [0.2, 0.6, 1.0, 0.1 + 0.9 * 0.5, 0.1, 0.1], rtol=1e-6)
    e = exponential_decay(3.0, 0.9, end_value=1.0)
    np.testing.assert_allclose([e(t) for t in (0, 1, 5, 100)], [3.0, 2.7, 3 * 0.9 ** 5, 1.0],
                               rtol=1e-6)
    with pytest.raises(ValueError, match="warmup_steps < total_steps"):
        warmup_cosine(1.0, 5, 5)
    with pytest.raises(ValueError, match="decay_rate > 0"):
        exponential_decay(1.0, 0.0)


def test_reduce_on_plateau_in_chain():
    params, g = _tree(0), _tree(1)
    base = adamw(1.0, param_info=INFO, weight_decay=0.0)
    tx = optax.chain(base, reduce_on_plateau(factor=0.5, patience=2))
    state = tx.init(params)
    scales, plateau_scales = [], []
    for _ in range(6):
        u, state = tx.update(g, state, params, value=jnp.asarray(1.0))  # the loss never improves
        r, _ = base.update(g, base.init(params), params)
        scales.append(float(u["w"][0, 0] / r["w"][0, 0]))
        plateau_scales.append(float(state[1].scale))
    np.testing.assert_allclose(scales, plateau_scales, rtol=1e-4)
    assert scales[0] == pytest.approx(1.0) and min(plateau_scales) <= 0.25
    assert set(np.log2(plateau_scales)) <= {0.0, -1.0, -2.0, -3.0}
