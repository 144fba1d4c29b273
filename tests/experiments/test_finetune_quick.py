"""``experiments/finetune.py --quick`` on small files of its own (one width, u-muP only): the
pretraining and fine-tuning rows, the summary, the plot and the metadata are written, and a
second call resumes without training."""

import csv
import json
import math

import finetune as experiment

from tests.train.finetune_helpers import write_classification, write_tagging


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_finetune_quick_writes_and_resumes(tmp_path):
    sst2 = write_classification(tmp_path / "sst2", test=False)
    wnut = write_tagging(tmp_path / "wnut17")
    argv = ["--quick", "--sst2", str(sst2), "--wnut17", str(wnut), "--out", str(tmp_path / "o"),
            "--parametrizations", "umup", "--widths", "16", "--umup-lrs", "-1",
            "--pretrain-steps", "4", "--finetune-steps", "4", "--eval-every", "2",
            "--batch-size", "8"]
    res = experiment.main(argv, log=lambda m: None)
    out = tmp_path / "o"
    (pre,) = _rows(out / "finetune_quick_pretrain.csv")
    assert (pre["parametrization"], pre["width"]) == ("umup", "16")
    assert math.isfinite(float(pre["val_loss"]))
    runs = _rows(out / "finetune_quick_runs.csv")
    assert {(r["task"], r["init"], r["metric"]) for r in runs} == {
        (t, i, m) for t, m in (("sst2", "accuracy"), ("wnut17", "f1"))
        for i in ("pretrained", "scratch")}
    for r in runs:
        assert 0.0 <= float(r["score"]) <= 1.0 and float(r["lr"]) == 0.5
    # the score of each row is the one its run wrote to dev_report.json
    work = out / "finetune_quick_work"
    for r in runs:
        report = json.loads((work / f"ft_{r['task']}_umup_16_{r['init']}_-1").joinpath(
            "dev_report.json").read_text())
        assert float(r["score"]) == report[r["metric"]]
    summary = _rows(out / "finetune_quick_summary.csv")
    assert len(summary) == 4 and all(s["best_lr_log2"] == "-1" for s in summary)
    with open(out / "finetune_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "finetune_quick_meta.json").read_text())
    assert meta["runs_this_call"] == 4 and meta["command"].startswith("python experiments/")
    assert set(res["claims"]) == {"sst2_umup", "wnut17_umup"}

    again = experiment.main(argv, log=lambda m: None)
    meta = json.loads((out / "finetune_quick_meta.json").read_text())
    assert meta["runs_this_call"] == 0 and len(again["runs"]) == 4  # nothing retrained
    assert again["summary"] == res["summary"]

    # only a fine-tuning setting changes: the pretrained encoder is kept, the runs start over
    # (here only one of the four: --max-runs 1; the summary covers the rows there are)
    pre_dir = work / "pre_umup_16"
    stamp = (pre_dir / "config.json").stat().st_mtime_ns
    argv2 = [a if a != "-1" else "-2" for a in argv]  # --umup-lrs -2
    third = experiment.main(argv2 + ["--max-runs", "1"], log=lambda m: None)
    meta = json.loads((out / "finetune_quick_meta.json").read_text())
    assert meta["pretrained_kept"] and (meta["runs_this_call"], meta["runs_missing"]) == (1, 3)
    assert len(third["runs"]) == 1 and len(third["summary"]) == 1
    assert (pre_dir / "config.json").stat().st_mtime_ns == stamp
    assert len(_rows(out / "finetune_quick_pretrain.csv")) == 1
    assert {float(r["lr_log2"]) for r in third["runs"]} == {-2.0}
