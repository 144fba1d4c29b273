"""Fine-tuning (``unitscale_jax.train.finetune``): pretrain -> finetune --init-from -> evaluate
-> predict, the frozen trunk, the heads' u-muP updates, the best checkpoint, early stopping."""

import csv
import json

import jax
import numpy as np
import pytest
from flax import nnx

from tests.train.finetune_helpers import TINY, write_classification, write_tagging
from unitscale_jax.cli import main
from unitscale_jax.train import build
from unitscale_jax.train.checkpoint import Checkpoints
from unitscale_jax.train.config import Config
from unitscale_jax.train.finetune import TRUNK, FineTuner, load_finetuned
from unitscale_jax.train.flags import parse_finetune_args
from unitscale_jax.train.metrics import read_metrics
from unitscale_jax.train.sample import load_run
from unitscale_jax.train.scores import classification_scores, tagging_scores


def _trees_equal(a, b) -> bool:
    a, b = jax.device_get(a), jax.device_get(b)
    return (jax.tree.structure(a) == jax.tree.structure(b)
            and all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shared_dirs):
    """A 'train --model encoder' run of a few steps."""
    run = tmp_path_factory.mktemp("pre") / "encoder"
    rc = main(["train", "--model", "encoder", *TINY, "--steps", "4", "--eval-every", "2",
               "--eval-batches", "1", "--data-dir", shared_dirs[0], "--run-dir", str(run)])
    assert rc == 0
    return run


def test_pretrain_finetune_evaluate_predict(pretrained, tmp_path, capsys):
    data = write_classification(tmp_path / "sst")
    run = tmp_path / "ft"
    _, _, pre_model, _ = load_run(pretrained, kind="encoder", log=lambda m: None)
    pre = _params(pre_model)
    capsys.readouterr()

    # at init: the trunk is the pretrained one, the head the fresh one of a scratch model
    cfg = parse_finetune_args(["--data", str(data), "--init-from", str(pretrained), "--steps",
                               "6", "--eval-every", "3", "--run-dir", str(run / "init"),
                               "--no-progress", "--batch-size", "8"])
    assert (cfg.model.d_model, cfg.model.kind) == (16, "encoder")  # taken from the pretrained run
    tuner = FineTuner(cfg, quiet=True)
    tuner.build_state()
    init = jax.device_get(tuner.state["params"])
    fresh = _params(build.build_model(tuner.cfg, tuner.data.vocab_size, task=tuner.task))
    tuner.close()
    assert set(init) == {"embed", "stack", "cls_head"} and set(pre) >= {"embed", "stack"}
    for k in init:
        assert _trees_equal(init[k], pre[k] if k in TRUNK else fresh[k]), k
    assert not _trees_equal(pre["embed"], fresh["embed"])  # the copy is not a coincidence

    # --freeze-trunk: after training the trunk is bitwise the pretrained one, the head moved
    rc = main(["finetune", "--data", str(data), "--init-from", str(pretrained), "--freeze-trunk",
               "--steps", "6", "--eval-every", "3", "--run-dir", str(run), "--no-progress",
               "--batch-size", "8", "--no-tensorboard", "--lr", "0.5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "init: trunk (embed, stack) from" in out and "fresh cls_head" in out
    final = load_finetuned(run, step=6, log=lambda m: None)
    for k in ("embed", "stack"):
        assert _trees_equal(final.params[k], pre[k]), k
    assert not _trees_equal(final.params["cls_head"], fresh["cls_head"])
    for name in ("labels.json", "dev_report.json", "test_report.json", "confusion.png",
                 "loss.png", "metrics.jsonl"):
        assert (run / name).is_file(), name

    # evaluate: the best checkpoint by dev accuracy, report.json
    rc = main(["evaluate", "--run-dir", str(run), "--data", str(data / "test.tsv")])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "accuracy" in out and "macro-F1" in out
    report = json.loads((run / "report.json").read_text())
    val = [r for r in read_metrics(run / "metrics.jsonl")
           if r["split"] == "validation" and r["step"] > 0]
    assert report["step"] in (3, 6)
    assert dict((r["step"], r["accuracy"]) for r in val)[report["step"]] == max(
        r["accuracy"] for r in val)
    assert report["n_examples"] == 24 and (run / "report_confusion.png").is_file()

    # predict: the input lines, unchanged, plus a prediction column
    rc = main(["predict", "--run-dir", str(run), "--data", str(data / "test.tsv"), "--out",
               str(tmp_path / "pred.tsv")])
    assert rc == 0, capsys.readouterr().err
    lines_in = (data / "test.tsv").read_text().splitlines()
    lines_out = (tmp_path / "pred.tsv").read_text().splitlines()
    assert lines_out[0] == lines_in[0] + "\tprediction"
    assert [x.rsplit("\t", 1)[0] for x in lines_out[1:]] == lines_in[1:]
    rows = list(csv.reader(lines_out[1:], delimiter="\t"))
    labels = final.vocab.labels
    scores = classification_scores([labels.index(r[1]) for r in rows],
                                   [labels.index(r[2]) for r in rows], labels)
    for k in ("accuracy", "macro_f1", "n_examples"):
        assert report[k] == scores[k], k

    # JSONL in, JSONL out: each record as it was plus "prediction", the same predictions
    records = [{"sentence": r[0], "label": int(r[1])} for r in rows]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["predict", "--run-dir", str(run), "--data", str(tmp_path / "in.jsonl"),
                 "--out", str(tmp_path / "pred.jsonl")]) == 0
    got = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert got == [{**r, "prediction": row[2]} for r, row in zip(records, rows)]

    # bad input: one line, exit 2, the existing output untouched (nothing half-written)
    written = (tmp_path / "pred.tsv").read_text()
    (tmp_path / "bad.tsv").write_text("sentence\tlabel\n")
    rc = main(["predict", "--run-dir", str(run), "--data", str(tmp_path / "bad.tsv"), "--out",
               str(tmp_path / "pred.tsv")])
    err = capsys.readouterr().err
    assert rc == 2 and "only a header row" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "pred.tsv").read_text() == written
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_tagging_evaluate_equals_scores_of_predict_output(tmp_path, capsys):
    data = write_tagging(tmp_path / "ner")
    run = tmp_path / "tag"
    rc = main(["finetune", "--task", "tag", "--data", str(data), *TINY, "--steps", "30",
               "--eval-every", "15", "--run-dir", str(run)])
    assert rc == 0, capsys.readouterr().err
    assert main(["evaluate", "--run-dir", str(run), "--data", str(data / "dev.conll")]) == 0
    report = json.loads((run / "report.json").read_text())
    assert main(["predict", "--run-dir", str(run), "--data", str(data / "dev.conll"), "--out",
                 str(tmp_path / "pred.conll")]) == 0
    capsys.readouterr()
    lines_in = (data / "dev.conll").read_text().splitlines()
    lines_out = (tmp_path / "pred.conll").read_text().splitlines()
    assert len(lines_in) == len(lines_out)
    gold, pred, g, p = [], [], [], []
    for a, b in zip(lines_in, lines_out):
        if not a.strip() or a.startswith("-DOCSTART-"):
            assert b == a  # blank and -DOCSTART- lines kept
            if g:
                gold.append(g), pred.append(p)
                g, p = [], []
            continue
        assert b.rsplit("\t", 1)[0] == a
        g.append(a.split("\t")[-1])
        p.append(b.split("\t")[-1])
    if g:
        gold.append(g), pred.append(p)
    scores = tagging_scores(gold, pred, scheme="iob2")
    for k in ("precision", "recall", "f1", "per_type", "n_examples"):
        assert report[k] == scores[k], k
    assert report["n_examples"] == 16 and report["f1"] > 0.5  # it learned something


def _one_step(cfg: Config) -> dict:
    tuner = FineTuner(cfg, quiet=True)
    tuner.build_state()
    before = jax.device_get(tuner.state["params"])
    tuner.step(next(tuner.train_it))
    after = jax.device_get(tuner.state["params"])
    tuner.close()
    return before, after


def test_frozen_trunk_unchanged_and_heads_get_the_umup_update(tmp_path):
    data = write_classification(tmp_path / "d", test=False)
    argv = ["--data", str(data), *TINY, "--steps", "5", "--eval-every", "0", "--no-checkpoint"]
    b0, a0 = _one_step(parse_finetune_args(argv + ["--run-dir", str(tmp_path / "a")]))
    b1, a1 = _one_step(parse_finetune_args(argv + ["--run-dir", str(tmp_path / "b"),
                                                   "--freeze-trunk"]))
    assert _trees_equal(b0, b1)
    for k in ("embed", "stack"):
        assert _trees_equal(a1[k], b1[k]) and not _trees_equal(a0[k], b0[k]), k
    # the head's update is the u-muP optimizer's, as without freezing (to rounding: the two
    # steps compile to different programs)
    h0, h1, init = a0["cls_head"]["kernel"], a1["cls_head"]["kernel"], b1["cls_head"]["kernel"]
    np.testing.assert_allclose(h1 - init, h0 - init, rtol=1e-4, atol=1e-6)
    assert np.abs(h1 - init).max() > 1e-2


def test_best_checkpoint_is_kept_and_named(tmp_path):
    state = {"x": np.arange(3, dtype=np.float32), "step": np.int32(0)}

    def save(ckpt, step, acc):
        ckpt.save(step, {**state, "step": np.int32(step)}, {"pos": step},
                  metrics=None if acc is None else {"accuracy": acc})

    ckpt = Checkpoints(tmp_path / "c", keep=1, async_save=False, log=lambda m: None,
                       best_metric="accuracy")
    for step, acc in ((1, 0.5), (2, 0.9), (3, 0.4)):
        save(ckpt, step, acc)
    assert ckpt.steps() == [2, 3] and ckpt.best_step() == 2
    ckpt.close()
    ckpt = Checkpoints(tmp_path / "c", keep=1, async_save=False, log=lambda m: None,
                       best_metric="accuracy")  # a resumed run remembers the best
    for step, acc in ((4, 0.6), (5, None), (6, 0.95)):
        save(ckpt, step, acc)
    assert ckpt.best_step() == 6 and ckpt.steps() == [6]
    save(ckpt, 7, 0.1)
    assert ckpt.steps() == [6, 7] and ckpt.best_step() == 6
    restored, data = ckpt.restore(6, jax.eval_shape(lambda: {**state}))
    assert int(restored["step"]) == 6 and data == {"pos": 6}
    ckpt.close()


def test_early_stopping_and_its_resumption(tmp_path, capsys):
    data = write_classification(tmp_path / "d", test=False)
    argv = ["finetune", "--data", str(data), *TINY, "--steps", "40", "--eval-every", "2",
            "--patience", "2", "--lr", "1e-9", "--run-dir", str(tmp_path / "r")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "early stop: no better dev accuracy in 2 evaluation(s) (best" in out
    rows = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["split"] == "validation"]
    assert [r["step"] for r in rows] == [0, 2, 4]  # 0 is the best; 2 and 4 are no better
    assert main(argv) == 0  # rerunning resumes the stopped run: nothing more to do
    out = capsys.readouterr().out
    assert "resumed from the checkpoint at step 4" in out and "done: 4 steps (0 this run" in out


def test_finetune_config_round_trip_leaves_train_configs_alone(tmp_path):
    cfg = parse_finetune_args(["--task", "tag", "--train", "a.conll", "--dev", "b.conll",
                               "--text-column", "x", "--text-column", "y", "--no-header",
                               "--scheme", "iobes", "--patience", "3"])
    d = cfg.to_dict()
    assert d["finetune"]["text_column"] == ["x", "y"] and d["finetune"]["header"] is False
    assert Config.from_dict(json.loads(cfg.to_json())) == cfg
    assert "finetune" not in Config().to_dict() and Config.from_dict(Config().to_dict()).finetune \
        is None


def test_init_from_an_exported_file_gives_the_same_trunk(pretrained, tmp_path, capsys):
    """finetune --init-from FILE (``unitscale-jax export`` of the encoder run) starts from the
    same trunk as --init-from the run directory, and takes the model flags from the file."""
    data = write_classification(tmp_path / "sst")
    exported = tmp_path / "enc.safetensors"
    assert main(["export", "--run-dir", str(pretrained), "--out", str(exported)]) == 0
    inits = {}
    for name, source in (("dir", pretrained), ("file", exported)):
        cfg = parse_finetune_args(["--data", str(data), "--init-from", str(source), "--steps",
                                   "2", "--run-dir", str(tmp_path / name), "--no-progress",
                                   "--batch-size", "8"])
        assert cfg.model.d_model == 16
        tuner = FineTuner(cfg, quiet=True)
        tuner.build_state()
        inits[name] = jax.device_get(tuner.state["params"])
        tuner.close()
    for k in TRUNK:
        if k in inits["dir"]:
            assert _trees_equal(inits["dir"][k], inits["file"][k]), k


def test_init_from_a_file_without_a_run_config(tmp_path, capsys):
    from safetensors.numpy import save_file
    data = write_classification(tmp_path / "sst")
    bare = tmp_path / "bare.safetensors"
    save_file({"embed.table": np.zeros((4, 2), np.float32)}, str(bare))
    rc = main(["finetune", "--data", str(data), "--init-from", str(bare), "--run-dir",
               str(tmp_path / "ft")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "records no run config" in err and not (tmp_path / "ft").exists()
