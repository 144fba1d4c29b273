"""``experiments/lora.py --quick`` on small files of its own (one width, one rank, u-muP only):
the full, head-only and LoRA rows with their trainable shares, the summary, plot and metadata, and a
second call that resumes without training, a third with a wider LR grid that adds only the
new points, and a changed setting that starts over."""

import csv
import json
import math

import lora as experiment
import pytest

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


def test_lora_quick_lm_task(tmp_path):
    """``--task lm``: decoders pretrained on the built-in corpus, adapted to another text;
    scored by validation loss, no head-only rows, the pretrained model's loss on the new text
    from the runs' step-0 evaluation."""
    text = tmp_path / "plays.txt"
    text.write_text("".join(f"KING {i}: Now is the winter of our discontent, made glorious "
                            f"summer by this sun of York; line {i}.\n" for i in range(400)),
                    encoding="utf-8")
    out = tmp_path / "o"
    argv = ["--quick", "--task", "lm", "--lm-data", str(text), "--out", str(out),
            "--parametrizations", "umup", "--widths", "16", "--ranks", "2", "--umup-lrs", "-1",
            "--pretrain-steps", "3", "--finetune-steps", "4", "--eval-every", "2",
            "--batch-size", "4", "--targets", "qkv,ffn_down"]
    res = experiment.main(argv, log=lambda m: None)
    runs = {r["method"]: r for r in _rows(out / "lora_lm_quick_runs.csv")}
    assert set(runs) == {"full", "lora"}
    full, lora = runs["full"], runs["lora"]
    adapters = 2 * (16 + 48) + 2 * (64 + 16)
    assert int(lora["total_params"]) == int(full["total_params"]) + adapters
    assert int(lora["trainable_params"]) == adapters
    assert float(full["trainable_share"]) == 1.0
    for r in runs.values():
        assert math.isfinite(float(r["dev_loss"])) and r["accuracy"] == "nan"
    summary = _rows(out / "lora_lm_quick_summary.csv")
    assert {s["method"] for s in summary} == {"full", "lora"}
    assert all(math.isfinite(float(s["best_val_loss"])) for s in summary)
    claims = res["claims"]["umup"]
    assert claims["lora_minus_full_val_loss_by_width"] == {
        16: float(lora["dev_loss"]) - float(full["dev_loss"])}
    assert "lora_minus_head_only_val_loss_by_width" not in claims
    zero = res["claims"]["zero_shot_val_loss"]["umup_w16"]
    # the adapted models start from the pretrained one: both end below its loss on the text
    assert math.isfinite(zero) and float(full["dev_loss"]) < zero
    with open(out / "lora_lm_quick.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_lora_lm_missing_text_is_one_line(tmp_path):
    with pytest.raises(SystemExit, match="pass --lm-data FILE"):
        experiment.main(["--quick", "--task", "lm", "--lm-data", str(tmp_path / "no.txt"),
                         "--out", str(tmp_path / "o")], log=lambda m: None)


def test_settings_added_later_resume_at_their_defaults():
    """A sweep started before ``--task`` existed resumes under the default ``--task sst2``
    and starts over under ``--task lm``."""
    new = vars(experiment.build_parser().parse_args([]))
    old = {k: v for k, v in new.items() if k not in ("task", "lm_data")}
    assert experiment._same_setup(old, new)
    assert not experiment._same_setup(old, {**new, "task": "lm"})
    assert not experiment._same_setup({**old, "seed": 1}, new)
