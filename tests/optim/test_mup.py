"""muP's Adam rule: the factor table, ``scale_by_mup`` / ``mup_adamw`` on a parameter tree, and a
``--parametrization mup`` Trainer run whose first update follows the table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from optim_helpers import INFO, TinyLM

from unitscale_jax import train
from unitscale_jax.nn import ParamInfo, param_info
from unitscale_jax.optim import (
    DEFAULT_BASE_FAN_IN,
    mup_adam,
    mup_adamw,
    mup_factor,
    mup_factors,
    scale_by_mup,
)
from unitscale_jax.optim._tree import path_key
from unitscale_jax.train.errors import UsageError


def test_factor_table():
    assert DEFAULT_BASE_FAN_IN == 64
    assert mup_factor(ParamInfo("weight", 256)) == 0.25
    assert mup_factor(ParamInfo("weight", 256), base_fan_in=128) == 0.5
    assert mup_factor(ParamInfo("weight", 32), base_fan_in=128) == 4.0
    # no depth factor (muP's residuals are plain x + f(x))
    assert mup_factor(ParamInfo("weight", 256, depth=16, depth_exponent=1.0)) == 0.25
    for t in ("embedding", "output", "bias", "norm"):
        assert mup_factor(ParamInfo(t, 1024, 4)) == 1.0, t
    # halving the width of every hidden weight doubles its learning rate
    assert mup_factor(ParamInfo("weight", 512)) == 2 * mup_factor(ParamInfo("weight", 1024))
    for bad in (0, -3.0, True):
        with pytest.raises(ValueError, match="base_fan_in must be a number > 0"):
            mup_factor(ParamInfo("weight", 4), base_fan_in=bad)
    got = mup_factors(INFO, base_fan_in=8)
    assert got == {"w": 0.5, "e": 1.0, "o": 1.0, "b": 1.0, "n": 1.0}


def test_scale_by_mup_on_a_model_and_missing_metadata():
    model = TinyLM(rngs=nnx.Rngs(0))  # d=16, hidden=24
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = scale_by_mup(param_info(model), base_fan_in=12)
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params))
    flat, _ = jax.tree_util.tree_flatten_with_path(updates)
    want = {"up": 12 / 16, "down": 12 / 24}
    for p, u in flat:
        key = path_key(p)
        np.testing.assert_array_equal(np.asarray(u), want.get(key[-1], 1.0), err_msg=str(key))
    with pytest.raises(ValueError, match="no u-muP metadata"):
        scale_by_mup({"w": INFO["w"]}).init({"w": jnp.ones(3), "x": jnp.ones(2)})
    tx = scale_by_mup({"w": INFO["w"]}, allow_missing=True)
    u, _ = tx.update({"w": jnp.ones(3), "x": jnp.ones(2)}, tx.init({"w": 0, "x": 0}))
    assert float(u["w"][0]) == 4.0 and float(u["x"][0]) == 1.0


def test_mup_adamw_decays_at_the_parameters_learning_rate():
    # zero gradients: Adam's direction is 0, so the update is -lr * factor * wd * theta
    params = {k: jnp.full((3,), 2.0) for k in INFO}
    tx = mup_adamw(0.5, param_info=INFO, base_fan_in=8, weight_decay=0.1)
    u, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    want = {"w": -0.5 * 0.5 * 0.1 * 2.0, "e": -0.5 * 0.1 * 2.0, "o": -0.5 * 0.1 * 2.0,
            "b": 0.0, "n": 0.0}
    for k, v in want.items():
        np.testing.assert_allclose(np.asarray(u[k]), v, rtol=1e-6, err_msg=k)
    # mup_adam has no decay; with eps -> 0 its first step is -lr * factor * sign(g)
    grads = {k: jnp.array([3.0, -1e-3, 0.5]) for k in INFO}
    tx = mup_adam(0.5, param_info=INFO, base_fan_in=8, eps=1e-30, b1=1 - 2 ** -3,
                  b2=1 - 2 ** -10)
    u, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(u["w"]), [-0.25, 0.25, -0.25], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(u["b"]), [-0.5, 0.5, -0.5], rtol=1e-6)


def _expected_factor(key, shape, base):
    """The muP factor from a parameter's path and Flax shape alone (kernels are
    ``[..., fan_in, fan_out]``): hidden kernels ``base / fan_in``, everything else 1."""
    name = "/".join(key)
    if key[-1] == "kernel" and "readout" not in name and "embed" not in name:
        return base / shape[-2]
    return 1.0


def test_a_mup_trainer_run_steps_by_the_table(tmp_path):
    lr, base = 2.0 ** -4, 16
    cfg = train.get_preset("tiny").replace(
        model={"parametrization": "mup", "d_model": 32, "n_layers": 1, "n_heads": 2},
        data={"seq_len": 16},
        # power-of-two complements of the betas and eps -> 0: Adam's first step is sign(g)
        optimizer={"name": "adam", "lr": lr, "schedule": "constant", "warmup_steps": 0,
                   "b1": 1 - 2 ** -3, "b2": 1 - 2 ** -10, "eps": 1e-30,
                   "mup_base_fan_in": base},
        training={"steps": 1, "batch_size": 4, "eval_every": 0, "run_dir": str(tmp_path / "r"),
                  "checkpoint": False, "progress": False, "tensorboard": False,
                  "plot": False})
    trainer = train.Trainer(cfg, quiet=True)
    try:
        trainer.build_state()
        before = jax.device_get(trainer.state["params"])
        trainer.step(next(trainer.train_it))
        after = jax.device_get(trainer.state["params"])
    finally:
        trainer.close()
    flat_b, _ = jax.tree_util.tree_flatten_with_path(before)
    flat_a = jax.tree.leaves(after)
    seen = set()
    for (p, b), a in zip(flat_b, flat_a):
        key = path_key(p)
        step = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
        want = lr * _expected_factor(key, b.shape, base)
        moved = step[step > 0]
        # (only the rows of the batch's tokens of the embedding get a gradient)
        assert moved.size > (0.01 if key[0] == "embed" else 0.99) * step.size, key
        np.testing.assert_allclose(moved, want, rtol=1e-4, err_msg=str(key))
        seen.add(want)
    # three distinct factors: d_model fan-in (16/32), d_ff fan-in, and 1
    assert len(seen) == 3 and lr * 0.5 in seen and lr in seen, seen


def test_mup_with_sgd_is_a_usage_error():
    cfg = train.get_preset("tiny").replace(model={"parametrization": "mup"},
                                           optimizer={"name": "sgd"})
    with pytest.raises(UsageError, match="mup trains with muP's Adam rule only"):
        train.resolve(cfg)
    with pytest.raises(UsageError, match="--mup-base-fan-in must be >= 1"):
        train.resolve(train.get_preset("tiny").replace(optimizer={"mup_base_fan_in": 0}))
