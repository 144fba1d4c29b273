"""``experiments/lora.py --quick`` on small files of its own (one width, one rank, u-muP only):
the full, head-only and LoRA rows with their trainable shares, the summary, plot and metadata, and a
second call that resumes without training, a third with a wider LR grid that adds only the
new points, and a changed setting that starts over."""

import csv
import json
import math

import lora as experiment

from tests.train.finetune_helpers import write_classification


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_lora_quick_writes_and_resumes(tmp_path):
    sst2 = write_classification(tmp_path / "sst2", test=False)
    out = tmp_path / "o"
    argv = ["--quick", "--sst2", str(sst2), "--out", str(out), "--parametrizations", "umup",
            "--widths", "16", "--ranks", "2", "--umup-lrs", "-1", "--pretrain-steps", "3",
            "--finetune-steps", "3", "--eval-every", "3", "--batch-size", "8",
            "--targets", "qkv,ffn_down"]
    res = experiment.main(argv, log=lambda m: None)
    runs = {r["method"]: r for r in _rows(out / "lora_quick_runs.csv")}
    assert set(runs) == {"full", "head", "lora"}
    full, head, lora = runs["full"], runs["head"], runs["lora"]
    # adapters on qkv (16 -> 48) and ffn_down (64 -> 16) at rank 2, one layer, plus the
    # 16 x 2 classification head (no bias)
    adapters = 2 * (16 + 48) + 2 * (64 + 16)
    assert float(full["trainable_share"]) == 1.0
    assert int(lora["total_params"]) == int(full["total_params"]) + adapters
    assert int(lora["trainable_params"]) == adapters + 16 * 2
    assert int(head["trainable_params"]) == 16 * 2
    assert int(head["total_params"]) == int(full["total_params"])
    assert float(lora["lora_mult"]) == 1.0
    for r in runs.values():
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and math.isfinite(float(r["dev_loss"]))
    summary = _rows(out / "lora_quick_summary.csv")
    assert len(summary) == 3 and all(float(s["best_lr_log2"]) == -1 for s in summary)
    with open(out / "lora_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / "lora_quick_meta.json").read_text())
    assert meta["runs_this_call"] == 3 and meta["command"].startswith("python experiments/")
    assert set(res["claims"]) == {"umup"}
    assert res["claims"]["umup"]["lora_trainable_share"] == {
        "w16_r2": float(lora["trainable_share"])}
    gain = res["claims"]["umup"]["lora_minus_head_only_accuracy_by_width"]
    assert gain == {16: float(lora["accuracy"]) - float(head["accuracy"])}
    again = experiment.main(argv, log=lambda m: None)
    meta = json.loads((out / "lora_quick_meta.json").read_text())
    assert meta["runs_this_call"] == 0 and again["summary"] == res["summary"]
    # a wider LR grid keeps the rows it has and adds only the new points
    i = argv.index("--umup-lrs")
    wider = [*argv[:i], "--umup-lrs=-1,0", *argv[i + 2:]]
    more = experiment.main(wider, log=lambda m: None)
    meta = json.loads((out / "lora_quick_meta.json").read_text())
    assert meta["runs_this_call"] == 3
    rows = _rows(out / "lora_quick_runs.csv")
    assert sorted((r["method"], float(r["lr_log2"])) for r in rows) == [
        ("full", -1.0), ("full", 0.0), ("head", -1.0), ("head", 0.0), ("lora", -1.0),
        ("lora", 0.0)]
    assert [r for r in rows if float(r["lr_log2"]) == -1] == list(runs.values())
    assert len(more["runs"]) == 6
    # any other change starts over
    other = [*argv, "--seed", "1"]
    experiment.main(other, log=lambda m: None)
    assert len(_rows(out / "lora_quick_runs.csv")) == 3
