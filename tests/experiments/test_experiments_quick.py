"""Smoke test of the three experiment scripts (their ``--smoke`` mode, in-process): every run
is recorded, the summaries, plots and metadata are written, a second call resumes instead of
retraining, and the multiplier sweep picks up the learning rate the transfer sweep found."""

import csv
import json
import math

import _sweep
import depth_transfer
import lr_transfer
import multiplier_sweeps
import pytest

DATA = str(_sweep.DEFAULT_DATA) if _sweep.DEFAULT_DATA.is_file() else "builtin"


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("experiments")


@pytest.fixture(scope="module")
def lr_result(out):
    return lr_transfer.main(["--smoke", "--data", DATA, "--out", str(out)])


def test_lr_transfer_smoke(lr_result, out):
    runs = _rows(out / "lr_transfer_smoke_runs.csv")
    # widths 8, 16 x (u-muP 2^0, 2^1; SP 2^-7, 2^-6)
    assert len(runs) == 8
    assert {(r["parametrization"], int(r["width"])) for r in runs} == {
        (p, w) for p in ("umup", "sp") for w in (8, 16)}
    assert {float(r["lr_log2"]) for r in runs if r["parametrization"] == "sp"} == {-7, -6}
    assert len({int(r["tokens"]) for r in runs}) == 1  # fixed token budget
    for r in runs:
        assert r["diverged"] == "False" and math.isfinite(float(r["val_loss"]))
        assert float(r["lr"]) == 2.0 ** float(r["lr_log2"])
    summary = _rows(out / "lr_transfer_smoke_summary.csv")
    assert len(summary) == 4
    for s in summary:
        mine = [float(r["val_loss"]) for r in runs
                if (r["parametrization"], r["width"]) == (s["parametrization"], s["width"])]
        assert float(s["best_val_loss"]) == pytest.approx(min(mine), rel=1e-5)
    assert _is_png(out / "lr_transfer_smoke.png")
    meta = json.loads((out / "lr_transfer_smoke_meta.json").read_text())
    assert meta["command"].startswith("python experiments/")
    assert set(meta["claims"]) >= {"umup", "sp", "umup_optimum_moves_at_most_one_factor_of_2",
                                   "sp_optimum_moves_more_than_umup"}
    assert len(meta["groups"]) == 4


def test_lr_transfer_resumes_without_training(lr_result, out):
    again = lr_transfer.main(["--smoke", "--data", DATA, "--out", str(out)])
    assert len(again["runs"]) == 8
    meta = json.loads((out / "lr_transfer_smoke_meta.json").read_text())
    assert meta["groups_this_call"] == 0 and len(meta["groups"]) == 4  # nothing retrained
    assert again["summary"] == lr_result["summary"]


def test_depth_transfer_smoke(out):
    res = depth_transfer.main(["--smoke", "--data", DATA, "--out", str(out),
                               "--parametrizations", "umup,umup_a1"])
    runs = _rows(out / "depth_transfer_smoke_runs.csv")
    assert {(int(r["depth"]), int(r["width"])) for r in runs} == {(1, 8), (2, 8)}
    assert len(runs) == 8 and _is_png(out / "depth_transfer_smoke.png")
    assert [(s["parametrization"], s["depth"]) for s in res["summary"]] == [
        ("umup", 1), ("umup", 2), ("umup_a1", 1), ("umup_a1", 2)]
    loss = {(r["parametrization"], int(r["depth"]), r["lr_log2"]): float(r["val_loss"])
            for r in runs}
    for lr in ("0", "1"):
        # one layer: n_layers^-a and depth^(a - 1) are 1 for every a, the same runs
        assert loss[("umup_a1", 1, lr)] == pytest.approx(loss[("umup", 1, lr)], rel=1e-6)
        # two layers: CompleteP's taus and learning rates differ from u-muP's (about 1% here;
        # "differ" is measured against the one-layer case's float bound)
        assert loss[("umup_a1", 2, lr)] != pytest.approx(loss[("umup", 2, lr)], rel=1e-6)
    assert "depth_exponent_keeping_the_optimum_fixed" in res["claims"]


def test_multiplier_sweeps_smoke(lr_result, out):
    res = multiplier_sweeps.main(["--smoke", "--data", DATA, "--out", str(out)])
    meta = json.loads((out / "multiplier_sweeps_smoke_meta.json").read_text())
    # the learning rate is u-muP's optimum of the lr_transfer smoke run at width 16, depth 1
    best = [s for s in lr_result["summary"]
            if s["parametrization"] == "umup" and s["width"] == 16][0]["best_lr_log2"]
    assert meta["settings"]["lr_log2"] == best
    assert meta["lr_source"].endswith("lr_transfer_smoke_summary.csv")
    runs = _rows(out / "multiplier_sweeps_smoke_runs.csv")
    base = [r for r in runs if r["multiplier"] == "baseline"]
    assert len(base) == 1 and len(runs) == 6
    for m in multiplier_sweeps.MULTIPLIERS:
        (r,) = [r for r in runs if r["multiplier"] == m]
        assert float(r["multiplier_value"]) == 2.0
        # each multiplier reaches the model: doubling it changes the loss
        assert float(r["val_loss"]) != pytest.approx(float(base[0]["val_loss"]), rel=1e-4)
    summary = {s["multiplier"]: s for s in res["summary"]}
    assert set(summary) == set(multiplier_sweeps.MULTIPLIERS)
    for s in summary.values():
        assert s["gap_of_1"] >= 0 and s["best_value"] in (1.0, 2.0)
    assert _is_png(out / "multiplier_sweeps_smoke.png")


def test_bad_arguments(out):
    with pytest.raises(SystemExit, match="at least two"):
        lr_transfer.main(["--widths", "16", "--data", DATA, "--out", str(out)])
    with pytest.raises(SystemExit, match="unknown"):
        multiplier_sweeps.main(["--multipliers", "nope", "--lr-log2", "0", "--out", str(out)])
    with pytest.raises(SystemExit, match="not found"):
        lr_transfer.main(["--smoke", "--data", str(out / "missing.txt"), "--out", str(out)])
