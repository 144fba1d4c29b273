"""``experiments/umup_workflow.py --quick`` at its smallest: the proxy's LR is its sweep's
optimum, the independent search picks each multiplier's best value, the combination reaches the
model unchanged at every width, SP and default u-muP get their own sweeps, the claim is what
the numbers say, and a rerun resumes without training."""

import csv
import json

import _sweep
import pytest
import umup_workflow as experiment

DATA = str(_sweep.DEFAULT_DATA) if _sweep.DEFAULT_DATA.is_file() else "builtin"
ARGV = ["--quick", "--data", DATA, "--widths", "32", "--multipliers", "attn_mult",
        "--values", "1", "--umup-lrs=-1:0", "--sp-offsets", "0:1", "--steps", "10",
        "--batch-size", "4", "--seq-len", "16", "--eval-batches", "2"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("umup_workflow")
    return out, experiment.main(ARGV + ["--out", str(out)], log=lambda m: None)


def test_workflow_stages(result):
    out, res = result
    runs = _rows(out / "umup_workflow_quick_runs.csv")
    proxy = [r for r in runs if r["experiment"] == "lr" and r["parametrization"] == "umup"
             and r["width"] == "16"]
    best = min(proxy, key=lambda r: float(r["val_loss"]))
    assert res["proxy_lr_log2"] == float(best["lr_log2"])
    search = [r for r in runs if r["experiment"] == "multipliers"]
    assert [(r["multiplier"], float(r["multiplier_value"])) for r in search] == [
        ("attn_mult", 2.0)]
    assert float(search[0]["lr_log2"]) == res["proxy_lr_log2"]
    # the independent search keeps the better of 1 (the proxy's own run) and 2
    better = float(search[0]["val_loss"]) < float(best["val_loss"])
    assert res["combined"] == ({"attn_mult": 2.0} if better else {})
    transfer = {int(r["width"]): r for r in runs if r["experiment"] == "transfer"}
    assert set(transfer) == {16, 32}
    for r in transfer.values():
        assert float(r["lr_log2"]) == res["proxy_lr_log2"]
        assert r["multiplier"] == experiment.combined_label({"attn_mult": res["combined"].get(
            "attn_mult", 1.0)})
    # at the proxy width the transferred model is the chosen run of the search, retrained
    chosen = search[0] if better else best
    assert float(transfer[16]["val_loss"]) == pytest.approx(float(chosen["val_loss"]),
                                                            rel=2e-5)
    # SP and default u-muP are swept at both widths, SP around its 1/width prior
    for w in (16, 32):
        sp = sorted(float(r["lr_log2"]) for r in runs if r["experiment"] == "lr"
                    and r["parametrization"] == "sp" and int(r["width"]) == w)
        prior = experiment.sp_prior_log2(w)
        assert sp == [prior, prior + 1]
        assert any(r["parametrization"] == "umup" and int(r["width"]) == w and
                   r["experiment"] == "lr" for r in runs)


def test_summary_and_claim(result):
    out, res = result
    summary = _rows(out / "umup_workflow_quick_summary.csv")
    assert {(int(r["width"]), r["arm"]) for r in summary} == {
        (w, a) for w in (16, 32) for a in experiment.ARMS}
    loss = {(int(r["width"]), r["arm"]): float(r["val_loss"]) for r in summary}
    runs = _rows(out / "umup_workflow_quick_runs.csv")
    sp32 = min(float(r["val_loss"]) for r in runs if r["parametrization"] == "sp"
               and r["width"] == "32")
    assert loss[(32, "sp_tuned")] == pytest.approx(sp32, rel=1e-5)
    claim = res["claims"]["transferred_umup_le_tuned_sp_at_largest_width"]
    assert claim["width"] == 32
    assert claim["holds"] == (loss[(32, "umup_transferred")] <= loss[(32, "sp_tuned")])
    assert claim["difference"] == pytest.approx(
        loss[(32, "umup_transferred")] - loss[(32, "sp_tuned")], abs=1e-4)
    meta = json.loads((out / "umup_workflow_quick_meta.json").read_text())
    assert meta["command"].startswith("python experiments/umup_workflow.py")
    assert meta["settings"]["umup_default_lr"] == "own sweep at every width"
    with open(out / "umup_workflow_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_rerun_resumes_without_training(result):
    out, res = result
    again = experiment.main(ARGV + ["--out", str(out)], log=lambda m: None)
    meta = json.loads((out / "umup_workflow_quick_meta.json").read_text())
    assert meta["groups_this_call"] == 0
    assert again["summary"] == res["summary"]


def test_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="other than the proxy"):
        experiment.main(["--widths", "64", "--proxy-width", "64", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown"):
        experiment.main(["--multipliers", "nope", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="multiple of --d-head"):
        experiment.main(["--widths", "100", "--out", str(tmp_path)])
