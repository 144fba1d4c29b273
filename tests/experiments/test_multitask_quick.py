"""``experiments/multitask.py --quick`` on small files of its own: a row per run and task
(each score the one its run's dev report holds, the best of its curve), the curves and the
plot, the claims in the metadata, and a rerun that resumes."""

import csv
import json

import multitask as experiment
import pytest

from tests.train.finetune_helpers import write_classification, write_tagging


def test_multitask_quick_writes_rows_and_claims(tmp_path):
    sst2 = write_classification(tmp_path / "sst2", test=False)
    wnut = write_tagging(tmp_path / "wnut17")
    argv = ["--quick", "--sst2", str(sst2), "--wnut17", str(wnut), "--out", str(tmp_path / "o"),
            "--width", "16", "--steps", "4", "--eval-every", "2", "--batch-size", "8",
            "--seq-len", "24"]
    res = experiment.main(argv, log=lambda m: None)
    out = tmp_path / "o"
    with open(out / "multitask_quick_runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["setting"], r["task"], r["metric"]) for r in rows} == {
        (s, t, m) for s in ("single", "multi") for t, m in (("sst2", "accuracy"),
                                                              ("wnut17", "f1"))}
    work = out / "multitask_quick_work"
    for r in rows:
        name = ("single_" + r["task"] + "/dev_report.json" if r["setting"] == "single" else
                f"multi/dev_report_{r['task']}.json")
        report = json.loads((work / name).read_text())
        assert float(r["score"]) == pytest.approx(report[r["metric"]], rel=1e-5)
        assert 0.0 <= float(r["score"]) <= 1.0
    meta = json.loads((out / "multitask_quick_meta.json").read_text())
    assert meta["claims"] == res["claims"]
    assert meta["command"].startswith("python experiments/multitask.py")
    for t in ("sst2", "wnut17"):
        c = meta["claims"][t]
        assert c["multi_minus_single"] == c["multi"] - c["single"]
    # the curves: every run's dev evaluations at steps 0, 2, 4; the runs table holds the best
    # after training (step 0, the untrained model, has no checkpoint to be picked)
    with open(out / "multitask_quick_curves.csv") as f:
        curve = list(csv.DictReader(f))
    for r in rows:
        mine = {int(c["step"]): float(c["score"]) for c in curve
                if (c["setting"], c["task"]) == (r["setting"], r["task"])}
        assert sorted(mine) == [0, 2, 4]
        assert float(r["score"]) == pytest.approx(max(mine[2], mine[4]), rel=1e-5)
    with open(out / "multitask_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # a rerun resumes the finished runs: the same rows, no training
    again = experiment.main(argv, log=lambda m: None)
    for setting in ("single_sst2", "single_wnut17", "multi"):
        done = json.loads((work / setting / "summary.json").read_text())
        assert done["start_step"] == done["steps"] == 4, setting  # resumed, finished
    assert again["claims"] == res["claims"]
    with open(out / "multitask_quick_runs.csv") as f:
        assert [r["score"] for r in csv.DictReader(f)] == [r["score"] for r in rows]
