"""Every optimizer x parametrization and every schedule builds and takes a finite step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unitscale_jax import nn, train


@pytest.fixture(scope="module")
def abstract():
    cfg = train.get_preset("tiny").replace(model={"d_model": 16, "n_layers": 1, "n_heads": 2},
                                           data={"seq_len": 8})
    model = nnx.eval_shape(lambda: train.build_model(train.resolve(cfg), 32))
    params = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, a.dtype),
                          nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return cfg, nnx.to_pure_dict(nn.param_info(model)), params


@pytest.mark.parametrize("parametrization, optimizer, schedule, extra", [
    ("umup", "adamw", "warmup_cosine", {}),
    ("umup", "adam", "constant", {}),
    ("umup", "sgd", "exponential", {}),
    ("umup", "adamw", "plateau", {"grad_clip": 1.0, "unit_scale_grads": True}),
    ("sp", "adamw", "warmup_cosine", {}),
    ("sp", "adam", "plateau", {}),
    ("sp", "sgd", "constant", {"weight_decay": 0.01}),
    ("mup", "adamw", "warmup_cosine", {"mup_base_fan_in": 32}),
    ("mup", "adam", "plateau", {}),
])
def test_optimizer_takes_a_finite_step(abstract, parametrization, optimizer, schedule, extra):
    cfg, info, params = abstract
    cfg = train.resolve(cfg.replace(model={"parametrization": parametrization},
                                    optimizer={"name": optimizer, "schedule": schedule,
                                               "warmup_steps": 2, **extra},
                                    training={"steps": 10}))
    tx, sched = train.build_optimizer(cfg, info)
    kw = {"value": jnp.float32(1.0)} if schedule == "plateau" else {}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)

    @jax.jit
    def two_steps(params):
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(grads, state, params, **kw)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params

    new = two_steps(params)
    moved = [float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(new), jax.tree.leaves(params))]
    assert all(np.isfinite(moved)) and max(moved) > 0
    assert float(sched(0)) == 0.0 and float(sched(2)) == pytest.approx(cfg.optimizer.lr)
    if schedule in ("warmup_cosine", "exponential"):
        end = cfg.optimizer.lr * cfg.optimizer.end_lr_fraction
        assert float(sched(10)) == pytest.approx(end, rel=1e-5)


def test_default_learning_rates_follow_the_parametrization():
    for p, opt, lr in [("umup", "adamw", 1.0), ("umup", "sgd", 0.5), ("sp", "adam", 1e-3),
                       ("sp", "sgd", 0.1), ("mup", "adamw", 1e-3)]:
        cfg = train.resolve(train.get_preset("tiny").replace(
            model={"parametrization": p}, optimizer={"name": opt}))
        assert cfg.optimizer.lr == lr
