"""The vmapped learning-rate lanes of ``experiments/_sweep.py`` equal separate ``train.run``
calls, and a diverging lane is recorded without disturbing the others."""

import math

import _sweep
import numpy as np
import pytest

from unitscale_jax import train


def _cfg(parametrization, tmp_path):
    return _sweep.base_config(parametrization=parametrization, width=16, depth=1, d_head=8,
                              seq_len=16, batch_size=4, steps=5, schedule="warmup_cosine",
                              data=None, eval_batches=2).replace(
        training={"run_dir": str(tmp_path / parametrization), "log_every": 1})


@pytest.mark.parametrize("parametrization,lr", [("umup", 2.0), ("sp", 2.0 ** -6)])
def test_lanes_equal_train_run(parametrization, lr, tmp_path):
    cfg = _cfg(parametrization, tmp_path)
    group = _sweep.train_lr_group(cfg, [lr / 4, lr, 1e30])
    ref = train.run(cfg.replace(optimizer={"lr": lr}), quiet=True)
    lane = group["lanes"][1]
    np.testing.assert_allclose(lane["val_loss"], ref["final_val_loss"], rtol=2e-5)
    last_train = [h["loss"] for h in ref["history"] if h["split"] == "train"][-1]
    # steps // 10 == 0 -> the tail mean is the last step's loss
    np.testing.assert_allclose(lane["train_loss"], last_train, rtol=2e-5)
    assert not lane["diverged"] and lane["diverged_step"] is None
    assert group["lanes"][0]["val_loss"] != pytest.approx(lane["val_loss"], rel=1e-3)
    huge = group["lanes"][2]
    assert huge["diverged"] and 1 <= huge["diverged_step"] <= 5
    assert group["tokens"] == 5 * 4 * 16 and group["n_params"] == ref["n_params"]


def test_rejects_weight_decay_and_bad_lrs(tmp_path):
    cfg = _cfg("umup", tmp_path)
    with pytest.raises(ValueError, match="weight_decay 0"):
        _sweep.train_lr_group(cfg.replace(optimizer={"weight_decay": 1e-4}), [1.0])
    with pytest.raises(ValueError, match="positive and finite"):
        _sweep.train_lr_group(cfg, [1.0, -1.0])


def test_optimum_and_grid_helpers():
    rows = [{"lr_log2": k, "val_loss": v, "diverged": d}
            for k, v, d in [(-1, 2.0, False), (0, 1.5, False), (1, 1.7, False),
                            (2, math.nan, True)]]
    o = _sweep.optimum(rows)
    assert o["best"] == 0 and o["bracketed"] and o["n_diverged"] == 1
    # parabola through (-1, 2.0), (0, 1.5), (1, 1.7): vertex at 0.5 * 0.3 / 0.7
    assert o["vertex"] == pytest.approx(0.15 / 0.7)
    edge = _sweep.optimum(rows[:2])
    assert edge["best"] == 0 and not edge["bracketed"] and edge["vertex"] is None
    assert _sweep.optimum(rows[3:])["best"] is None
    assert _sweep.int_list("-2:1") == [-2, -1, 0, 1]
    assert _sweep.int_list("16,32") == [16, 32]
