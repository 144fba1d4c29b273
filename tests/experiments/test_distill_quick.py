"""``experiments/distill.py --quick`` at its smallest (u-muP, one seed, a few steps): the
students' own learning rate, the rows, summary, plot and metadata are written, and a second
call resumes without training."""

import csv
import json
import math

import distill as experiment
import pytest


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_distill_quick_writes_and_resumes(tmp_path):
    argv = ["--quick", "--out", str(tmp_path / "o"), "--parametrizations", "umup", "--seeds",
            "0", "--teacher-steps", "6", "--steps", "4", "--eval-every", "4",
            "--student-lr-log2", "-1"]
    res = experiment.main(argv, log=lambda m: None)
    out = tmp_path / "o"
    runs = _rows(out / "distill_quick_runs.csv")
    assert [(r["role"], r["width"]) for r in runs] == [("teacher", "32"), ("alone", "16"),
                                                      ("distilled", "16")]
    assert all(math.isfinite(float(r["val_loss"])) for r in runs)
    # the two students differ only in the teacher: different losses, the same steps
    alone, distilled = runs[1], runs[2]
    assert alone["val_loss"] != distilled["val_loss"] and alone["steps"] == distilled["steps"]
    work = out / "distill_quick_work"
    cfg = json.loads((work / "distilled_umup_0" / "config.json").read_text())
    assert cfg["training"]["distill_from"] == str(work / "teacher_umup")
    # --student-lr-log2 sets both students' learning rate; the teacher keeps the default (None)
    lrs = {run: json.loads((work / run / "config.json").read_text())["optimizer"]["lr"]
           for run in ("teacher_umup", "alone_umup_0", "distilled_umup_0")}
    assert lrs == {"teacher_umup": None, "alone_umup_0": 0.5, "distilled_umup_0": 0.5}
    (s,) = _rows(out / "distill_quick_summary.csv")
    assert float(s["alone_mean_val_loss"]) == pytest.approx(float(alone["val_loss"]), rel=1e-5)
    gain = float(alone["val_loss"]) - float(distilled["val_loss"])
    assert res["claims"]["umup_distilled_lower_at_every_seed"] == (gain > 0)
    with open(out / "distill_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "distill_quick_meta.json").read_text())
    assert meta["runs_this_call"] == 3 and meta["command"].startswith("python experiments/")
    again = experiment.main(argv, log=lambda m: None)
    meta = json.loads((out / "distill_quick_meta.json").read_text())
    assert meta["runs_this_call"] == 0 and again["summary"] == res["summary"]
