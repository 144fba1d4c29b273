"""``evaluate`` / ``predict --task NAME`` on a multi-task run: each task's report equals what
the fine-tuning run reported for it (same dev file, same best checkpoint), the predictions
are that task's labels, and a missing or unknown task name is one line listing the tasks."""

import csv
import json

import pytest

from tests.train.finetune_helpers import TINY, fails, write_classification, write_tagging
from unitscale_jax.cli import main
from unitscale_jax.train.scores import classification_scores, tagging_scores

SCORES = {"classify": ("accuracy", "macro_f1", "n_examples", "per_class", "labels",
                       "confusion"),
          "tag": ("precision", "recall", "f1", "support", "n_examples", "per_type", "macro",
                  "weighted")}


@pytest.fixture(scope="module")
def multitask_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mt_eval")
    cls, tag = write_classification(root / "cls"), write_tagging(root / "tag")
    run = root / "mt"
    assert main(["finetune", *TINY, "--steps", "8", "--eval-every", "2", "--run-dir", str(run),
                 "--task", f"sst=classify:{cls}", "--task", f"ner=tag:{tag}"]) == 0
    return run, {"sst": cls / "dev.tsv", "ner": tag / "dev.conll"}


@pytest.mark.parametrize("name, kind", [("sst", "classify"), ("ner", "tag")])
def test_evaluate_a_task_gives_the_runs_own_report(multitask_run, capsys, name, kind):
    run, dev = multitask_run
    assert main(["evaluate", "--run-dir", str(run), "--data", str(dev[name]), "--task",
                 name]) == 0
    out = capsys.readouterr().out
    report = json.loads((run / f"report_{name}.json").read_text())
    final = json.loads((run / f"dev_report_{name}.json").read_text())
    assert report["task"] == final["task"] == kind and report["task_name"] == name
    assert report["step"] == final["step"]  # the best checkpoint, by the run's mean score
    for key in SCORES[kind]:
        assert report[key] == final[key], key
    assert f"step {final['step']} of {run} (task {name})" in out
    assert (run / f"report_{name}_confusion.png").exists() == (kind == "classify")


def test_predict_writes_the_tasks_labels(multitask_run, tmp_path):
    run, dev = multitask_run
    out = tmp_path / "sst.tsv"
    assert main(["predict", "--run-dir", str(run), "--data", str(dev["sst"]), "--out", str(out),
                 "--task", "sst"]) == 0
    rows = list(csv.DictReader(out.open(), delimiter="\t"))
    labels = json.loads((run / "labels_sst.json").read_text())["labels"]
    assert len(rows) == 24 and {r["prediction"] for r in rows} <= set(labels)
    final = json.loads((run / "dev_report_sst.json").read_text())
    ids = {label: i for i, label in enumerate(labels)}
    scores = classification_scores([ids[r["label"]] for r in rows],
                                   [ids[r["prediction"]] for r in rows], labels)
    assert scores["accuracy"] == final["accuracy"] and scores["confusion"] == final["confusion"]

    out = tmp_path / "ner.conll"
    assert main(["predict", "--run-dir", str(run), "--data", str(dev["ner"]), "--out", str(out),
                 "--task", "ner"]) == 0
    tags = set(json.loads((run / "labels_ner.json").read_text())["labels"])
    true, pred = [[]], [[]]
    for line in out.read_text().splitlines():
        cols = line.split("\t")
        if not line.strip():
            true.append([]), pred.append([])
        elif cols[0] != "-DOCSTART-":
            assert len(cols) == 3 and cols[2] in tags, line
            true[-1].append(cols[1]), pred[-1].append(cols[2])
    true, pred = [s for s in true if s], [s for s in pred if s]
    final = json.loads((run / "dev_report_ner.json").read_text())
    assert len(true) == final["n_examples"] == 16
    assert tagging_scores(true, pred)["f1"] == final["f1"]


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_several_tasks_and_no_task_name_lists_them(multitask_run, tmp_path, capsys, command):
    run, dev = multitask_run
    out = ["--out", str(tmp_path / "p.tsv")] if command == "predict" else []
    fails(capsys, [command, "--run-dir", str(run), "--data", str(dev["sst"]), *out],
          f"--run-dir {run} is a multi-task run of the tasks sst (classify), ner (tag); pick "
          "one with --task NAME.")
    fails(capsys, [command, "--run-dir", str(run), "--data", str(dev["sst"]), *out, "--task",
                   "sts"],
          "--task sts is not a task of the run; the tasks of", "are sst (classify), ner (tag)")
    assert not (tmp_path / "p.tsv").exists() and not (run / "report.json").exists()


def test_task_name_on_a_single_task_run(tmp_path, capsys):
    cls = write_classification(tmp_path / "cls")
    run = tmp_path / "single"
    assert main(["finetune", *TINY, "--steps", "1", "--run-dir", str(run), "--data",
                 str(cls)]) == 0
    capsys.readouterr()
    fails(capsys, ["evaluate", "--run-dir", str(run), "--data", str(cls / "dev.tsv"), "--task",
                   "sst"], f"--task sst: --run-dir {run} is a single-task run (a classify "
                   "head); drop --task.")
