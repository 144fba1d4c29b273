"""``unitscale-jax finetune --task NAME=KIND:PATH ...``: per-task dev metrics in metrics.jsonl,
per-task reports, a weight-0 task leaving the other's run as alone, bad specs (one line)."""

import json

import pytest

from tests.train.conftest import read_rows
from tests.train.finetune_helpers import TINY, fails, write_classification, write_tagging
from unitscale_jax.cli import main


def _run(tmp_path, name, *args, steps=3):
    run = tmp_path / name
    rc = main(["finetune", *TINY, "--steps", str(steps), "--eval-every", "1", "--run-dir",
               str(run), *args])
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt")
    return write_classification(root / "cls"), write_tagging(root / "tag")


def test_multitask_run_logs_and_reports_every_task(tmp_path, dirs, capsys):
    cls, tag = dirs
    run = _run(tmp_path, "mt", "--task", f"sst=classify:{cls}", "--task", f"ner=tag:{tag}",
               "--task-weight", "ner=0.5", "--task-sampling", "temperature:2")
    out = capsys.readouterr().out
    assert "tasks: sst (classify, 64 training examples, weight 1" in out
    dev = [r for r in read_rows(run) if r["split"] == "validation"]
    assert [r["step"] for r in dev] == [0, 1, 2, 3]
    for r in dev:
        assert {"sst_loss", "sst_accuracy", "sst_macro_f1", "ner_loss", "ner_f1", "score"} <= set(r)
        assert r["loss"] == pytest.approx(r["sst_loss"] + 0.5 * r["ner_loss"], rel=1e-5)
        assert r["score"] == pytest.approx((r["sst_accuracy"] + r["ner_f1"]) / 2)
    summary = json.loads((run / "summary.json").read_text())
    assert {"sst_accuracy", "ner_f1"} <= set(summary["best_dev"])
    sst = json.loads((run / "dev_report_sst.json").read_text())
    assert sst["task"] == "classify" and sst["task_name"] == "sst" and "accuracy" in sst
    assert json.loads((run / "test_report_sst.json").read_text())["split"] == "test"
    assert json.loads((run / "dev_report_ner.json").read_text())["task"] == "tag"
    assert "sst_accuracy" in out and "ner_f1" in out  # the final report prints them


def test_weight_zero_equals_the_single_task_run(tmp_path, dirs):
    cls, tag = dirs
    single = _run(tmp_path, "single", "--data", str(cls))
    multi = _run(tmp_path, "multi", "--task", f"a=classify:{cls}", "--task", f"b=tag:{tag}",
                 "--task-weight", "b=0")
    s_rows, m_rows = read_rows(single), read_rows(multi)
    s_train = [r["loss"] for r in s_rows if r["split"] == "train"]
    m_train = [r["loss"] for r in m_rows if r["split"] == "train"]
    assert len(s_train) == 3 and m_train == pytest.approx(s_train, rel=1e-5)
    s_dev = [r for r in s_rows if r["split"] == "validation"]
    m_dev = [r for r in m_rows if r["split"] == "validation"]
    assert [r["a_loss"] for r in m_dev] == pytest.approx([r["loss"] for r in s_dev], rel=1e-5)
    assert [r["a_accuracy"] for r in m_dev] == [r["accuracy"] for r in s_dev]
    assert [r["a_macro_f1"] for r in m_dev] == pytest.approx([r["macro_f1"] for r in s_dev])


@pytest.mark.parametrize("args, needles", [
    (["--task", "sst=classify"], ["'sst=classify' does not parse", "NAME=KIND:PATH"]),
    (["--task", "sstclassify:x"], ["does not parse"]),
    (["--task", "sst=regress:x"], ["kind 'regress'"]),
    (["--task", "a=tag:x", "--task", "a=tag:y"], ["more than once"]),
    (["--task", "classify", "--task", "a=tag:x"], ["mix the single- and the multi-task"]),
    (["--task", "a=tag:x", "--task-weight", "a=-1"], [">= 0"]),
    (["--task", "a=tag:x", "--task-sampling", "temperature:x"], ["--task-sampling"]),
    (["--task", "a=tag:x", "--data", "y"], ["--data", "drop --data"]),
    (["--task", "a=mlm:x"], ["auxiliary task; add a labelled one"]),
])
def test_bad_multitask_flags(tmp_path, capsys, args, needles):
    fails(capsys, ["finetune", *TINY, "--run-dir", str(tmp_path / "run"), *args], *needles)
    assert not (tmp_path / "run").exists()


def test_missing_task_directory(tmp_path, dirs, capsys):
    cls, _ = dirs
    fails(capsys, ["finetune", *TINY, "--run-dir", str(tmp_path / "run"), "--task",
                   f"a=classify:{cls}", "--task", f"b=tag:{tmp_path / 'nope'}"], "nope")


def test_mlm_auxiliary_task(tmp_path, dirs):
    cls, _ = dirs
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"the film was good and the plot was {w} number {i}\n"
                              for i in range(300) for w in ("fine", "dull")))
    run = _run(tmp_path, "aux", "--task", f"sst=classify:{cls}", "--task", f"aux=mlm:{corpus}",
               "--task-weight", "aux=0.3")
    dev = [r for r in read_rows(run) if r["split"] == "validation"]
    assert all({"sst_accuracy", "aux_loss", "score"} <= set(r) for r in dev)
    assert dev[-1]["aux_loss"] < dev[0]["aux_loss"]  # the MLM head and trunk learn
    for r in dev:
        assert r["loss"] == pytest.approx(r["sst_loss"] + 0.3 * r["aux_loss"], rel=1e-5)
    assert "aux_loss" in json.loads((run / "summary.json").read_text())["best_dev"]
