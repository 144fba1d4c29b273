"""``experiments/grow.py --quick`` at its smallest (u-muP, a few steps): the three arms are
trained, the grown run starts where the shallow one stopped (in steps and FLOPs) with the
same learning rate, and the curves, summary, plot and metadata are written."""

import csv
import json
import math

import grow as experiment
import pytest


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_grow_quick_writes_the_three_arms(tmp_path):
    out = tmp_path / "o"
    argv = ["--quick", "--out", str(out), "--parametrizations", "umup", "--steps", "4",
            "--eval-every", "2"]
    res = experiment.main(argv, log=lambda m: None)
    curves = _rows(out / "grow_quick_curves.csv")
    by = {arm: [r for r in curves if r["arm"] == arm] for arm in ("scratch", "small", "grown")}
    assert [int(r["step"]) for r in by["scratch"]] == [0, 2, 4]
    assert [int(r["step"]) for r in by["small"]] == [0, 2]
    assert [int(r["step"]) for r in by["grown"]] == [2, 4]
    assert all(math.isfinite(float(r["val_loss"])) for r in curves)
    # the grown arm starts at the shallow arm's FLOPs and spends less than the deep one
    assert float(by["grown"][0]["flops"]) == float(by["small"][-1]["flops"]) > 0
    assert float(by["grown"][-1]["flops"]) < float(by["scratch"][-1]["flops"])
    # 1 -> 2 layers, the same learning rate
    work = out / "grow_quick_work"
    small, grown = (json.loads((work / f"{a}_umup" / "config.json").read_text())
                    for a in ("small", "grown"))
    assert (small["model"]["n_layers"], grown["model"]["n_layers"]) == (1, 2)
    assert small["optimizer"] == grown["optimizer"]
    (s,) = _rows(out / "grow_quick_summary.csv")
    assert float(s["grown_step0_val_loss"]) == float(by["grown"][0]["val_loss"])
    assert res["claims"]["umup_grown_at_most_scratch_loss"] == (
        float(s["grown_final_val_loss"]) <= float(s["scratch_final_val_loss"]))
    # the scratch run's loss at the grown run's FLOPs: its curve interpolated in FLOPs
    sc = by["scratch"]
    f, (lo, hi) = float(s["grown_flops"]), (float(sc[0]["flops"]), float(sc[-1]["flops"]))
    assert lo < f < hi
    i = next(k for k in range(1, len(sc)) if float(sc[k]["flops"]) >= f)
    (f0, l0), (f1, l1) = ((float(sc[k]["flops"]), float(sc[k]["val_loss"])) for k in (i - 1, i))
    assert float(s["scratch_val_loss_at_grown_flops"]) == pytest.approx(
        l0 + (l1 - l0) * (f - f0) / (f1 - f0), rel=1e-6)
    assert res["claims"]["umup_grown_at_most_scratch_loss_at_equal_flops"] == (
        float(s["grown_final_val_loss"]) <= float(s["scratch_val_loss_at_grown_flops"]))
    with open(out / "grow_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "grow_quick_meta.json").read_text())
    assert meta["command"].startswith("python experiments/grow.py")
