"""``experiments/batch_horizon.py --quick`` at its smallest: both axes are swept (the shared
configuration once), the batch axis keeps the tokens fixed, each curve's optimum and each fit
are what the runs say, a rerun resumes; and the fit recovers a known exponent."""

import csv
import json
import math
import random

import _sweep
import batch_horizon as experiment
import numpy as np
import pytest

DATA = str(_sweep.DEFAULT_DATA) if _sweep.DEFAULT_DATA.is_file() else "builtin"
ARGV = ["--quick", "--data", DATA, "--batch-sizes", "2,4,8", "--tokens", "512",
        "--horizon-batch", "4", "--horizons", "8,16", "--umup-lrs=-1:1", "--sp-offsets=-1:1",
        "--eval-batches", "2"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_horizon")
    return out, experiment.main(ARGV + ["--out", str(out)], log=lambda m: None)


def test_both_axes_swept(result):
    out, _ = result
    runs = _rows(out / "batch_horizon_quick_runs.csv")
    configs = {(r["parametrization"], int(r["batch_size"]), int(r["steps"])) for r in runs}
    assert configs == {(p, b, t) for p in ("umup", "sp")
                       for b, t in [(2, 16), (4, 8), (8, 4), (4, 16)]}
    for p in ("umup", "sp"):
        shared = [r for r in runs if (r["parametrization"], r["batch_size"], r["steps"])
                  == (p, "4", "8")]
        assert len(shared) == 3  # batch 4 x 8 steps is on both axes, trained once
    for r in runs:
        assert int(r["tokens"]) == int(r["batch_size"]) * int(r["steps"]) * 16
    assert {int(r["tokens"]) for r in runs if int(r["steps"]) * int(r["batch_size"]) == 32} \
        == {512}


def test_summary_and_fits_follow_the_runs(result):
    out, res = result
    runs = _rows(out / "batch_horizon_quick_runs.csv")
    summary = _rows(out / "batch_horizon_quick_summary.csv")
    assert len(summary) == 2 * (3 + 2)
    for s in summary:
        mine = [r for r in runs if (r["parametrization"], r["batch_size"], r["steps"])
                == (s["parametrization"], s["batch_size"], s["steps"])]
        best = min(mine, key=lambda r: float(r["val_loss"]))
        assert float(s["best_val_loss"]) == pytest.approx(float(best["val_loss"]), rel=1e-5)
        assert float(s["best_lr_log2"]) == float(best["lr_log2"])
        opt = float(s["seed_opt_lr_log2"])
        assert (opt == float(s["best_lr_log2"]) if s["seed_opt_kind"] == "grid"
                else abs(opt - float(s["best_lr_log2"])) <= 0.5)
    for f in res["fits"]:
        pts = [(math.log2(int(s["x"])), float(s["seed_opt_lr_log2"])) for s in summary
               if (s["parametrization"], s["axis"]) == (f["parametrization"], f["axis"])]
        k, c = np.polyfit(*zip(*pts), 1)
        assert f["k"] == pytest.approx(k, abs=1e-6) and f["n_points"] == len(pts)
    fits = _rows(out / "batch_horizon_quick_fits.csv")
    assert {(f["parametrization"], f["axis"]) for f in fits} == {
        (p, a) for p in ("umup", "sp") for a in ("batch", "horizon")}
    meta = json.loads((out / "batch_horizon_quick_meta.json").read_text())
    assert set(meta["claims"]) == {"umup_batch", "umup_horizon", "sp_batch", "sp_horizon"}
    with open(out / "batch_horizon_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_without_training(result):
    out, res = result
    again = experiment.main(ARGV + ["--out", str(out)], log=lambda m: None)
    meta = json.loads((out / "batch_horizon_quick_meta.json").read_text())
    assert meta["groups_this_call"] == 0 and again["summary"] == res["summary"]


def test_fit_recovers_a_known_exponent():
    rng = random.Random(0)
    summary = [{"parametrization": "umup", "axis": "batch", "x": b, "bracketed": True,
                "seed_opt_lr_log2": "/".join(f"{-1 + 0.5 * math.log2(b) + rng.gauss(0, 0.05):.3f}"
                                             for _ in range(3))}
               for b in (8, 16, 32, 64)]
    f = experiment.fit(summary, "umup", "batch")
    assert f["n_points"] == 12 and f["k"] == pytest.approx(0.5, abs=0.06)
    assert f["k_lo"] < 0.5 < f["k_hi"] and f["k_hi"] - f["k_lo"] < 0.3
    assert f["consistent_rules"] == ["LR ∝ sqrt(B)"] and f["closest_rule"] == "LR ∝ sqrt(B)"
    flat = [dict(s, seed_opt_lr_log2="-1.000/-1.000") for s in summary]
    g = experiment.fit(flat, "umup", "batch")
    assert g["k"] == pytest.approx(0.0, abs=1e-12) and g["k_se"] == pytest.approx(0.0)
    assert g["consistent_rules"] == ["constant LR"]


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="not a multiple"):
        experiment.main(["--tokens", "1000", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="at least two"):
        experiment.main(["--horizons", "100", "--out", str(tmp_path)])
