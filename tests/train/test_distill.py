"""``train --distill-from``: a decoder student learns from a teacher run inside the jitted
step (teacher == student at weight 1: zero loss and gradient; weight 0: the plain run),
resumes without the teacher in its checkpoints, and bad input is one clear line."""

import json
import shutil

import jax
import numpy as np
import pytest

from tests.train.conftest import SMALL
from unitscale_jax import train
from unitscale_jax.cli import main
from unitscale_jax.train.trainer import Trainer


def _cfg(tmp, name, **training):
    return train.get_preset("tiny").replace(
        model={"d_model": 32, "n_layers": 1, "n_heads": 2},
        data={"seq_len": 32},
        training={"steps": 4, "batch_size": 8, "eval_every": 4, "eval_batches": 2,
                  "run_dir": str(tmp / name), "progress": False, "tensorboard": False,
                  "plot": False, **training})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 4-step decoder run (d_model 32) with a checkpoint: the teacher."""
    tmp = tmp_path_factory.mktemp("distill")
    cfg = _cfg(tmp, "teacher")
    train.run(cfg, quiet=True)
    return tmp, cfg


def test_teacher_equal_to_student_gives_zero_loss_and_gradient(teacher):
    tmp, _ = teacher
    src = str(tmp / "teacher")
    for par in ("umup", "sp"):
        if par == "sp":  # an SP teacher of the same shape
            src = str(tmp / "teacher_sp")
            train.run(_cfg(tmp, "teacher_sp").replace(model={"parametrization": "sp"}),
                      quiet=True)
        cfg = _cfg(tmp, f"same_{par}", init_from=src, distill_from=src, distill_weight=1.0,
                   distill_temperature=2.0).replace(model={"parametrization": par})
        trainer = Trainer(cfg, quiet=True)
        trainer.build_state()
        assert "teacher" in trainer.state
        m = jax.device_get(trainer.step(next(trainer.train_it)))
        # zero up to float32 rounding (the teacher runs in eval mode, a separately fused graph);
        # a u-muP step's gradient norm is O(1)
        assert abs(float(m["loss"])) < 1e-6 and float(m["grad_norm"]) < 1e-4, (par, m)
        trainer.close()


def test_weight_zero_is_the_plain_run_and_resume_keeps_the_teacher_out(teacher):
    tmp, _ = teacher
    plain = train.run(_cfg(tmp, "plain").replace(model={"d_model": 16}), quiet=True)
    kw = dict(distill_from=str(tmp / "teacher"), distill_weight=0.0, checkpoint_every=2)
    distilled = train.run(_cfg(tmp, "w0", **kw).replace(model={"d_model": 16}), quiet=True)
    losses = lambda s: [r["loss"] for r in s["history"]]  # noqa: E731
    np.testing.assert_allclose(losses(distilled), losses(plain), rtol=1e-6)
    # a real mix trains differently, and resumes: the teacher is reloaded, not checkpointed
    kw.update(distill_weight=0.5, distill_temperature=2.0)
    mixed = train.run(_cfg(tmp, "mixed", **kw).replace(model={"d_model": 16}), quiet=True)
    assert losses(mixed) != losses(plain)
    state = json.loads((tmp / "mixed" / "checkpoints" / "4" / "state" / "_METADATA")
                       .read_text())
    keys = {k.split("'")[1] for k in state["tree_metadata"]}
    assert "teacher" not in keys and "params" in keys, keys
    resumed = train.run(_cfg(tmp, "mixed", steps=6, **kw).replace(model={"d_model": 16}),
                        quiet=True)
    assert resumed["start_step"] == 4 and np.isfinite(resumed["final_val_loss"])


def _one_line(capsys, rc, *needles):
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


def _edited_copy(tmp, name, section, **fields):
    dst = tmp / name
    if not dst.exists():
        shutil.copytree(tmp / "teacher", dst)
        cfg = json.loads((dst / "config.json").read_text())
        cfg[section].update(fields)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_bad_teachers(teacher, capsys):
    tmp, _ = teacher
    argv = ["train", *SMALL, "--steps", "2", "--run-dir", str(tmp / "bad")]
    (tmp / "not_a_run").mkdir(exist_ok=True)
    cases = [
        (tmp / "missing", ["no config.json"]),
        (tmp / "not_a_run", ["no config.json"]),
        (_edited_copy(tmp, "bytes_other", "data", tokenizer="hf:other/tokenizer.json"),
         ["the teacher's tokenizer is 'hf:other/tokenizer.json'", "--tokenizer"]),
        (_edited_copy(tmp, "encoder", "model", kind="encoder"),
         ["'train --model encoder' run", "needs a 'train --model decoder' run"]),
        (_edited_copy(tmp, "short", "data", seq_len=16), ["rows of 16 tokens"]),
    ]
    for src, needles in cases:
        rc = main([*argv, "--distill-from", str(src)])
        _one_line(capsys, rc, *needles)
        assert not (tmp / "bad").exists()  # nothing left behind
    rc = main(["train", *SMALL, "--model", "encoder", "--run-dir", str(tmp / "bad"),
               "--distill-from", str(tmp / "teacher")])
    _one_line(capsys, rc, "not 'train --model encoder'")


@pytest.mark.parametrize("flags, needle", [
    (["--distill-temperature", "0"], "--distill-temperature must be > 0, got 0.0"),
    (["--distill-temperature", "-1"], "--distill-temperature must be > 0"),
    (["--distill-weight", "1.5"], "--distill-weight must be in [0, 1], got 1.5"),
    (["--distill-weight", "-0.1"], "--distill-weight must be in [0, 1]"),
])
def test_bad_distillation_settings(capsys, tmp_path, flags, needle):
    rc = main(["train", *SMALL, "--run-dir", str(tmp_path / "r"), "--distill-from",
               str(tmp_path), *flags])
    _one_line(capsys, rc, needle)


def test_finetune_classifier_distillation(teacher, tmp_path, capsys):
    """finetune --distill-from a fine-tuned classifier: teacher == student at weight 1 gives a
    zero loss and gradient; a teacher with other labels or of another kind is refused."""
    from tests.train.finetune_helpers import TINY, write_classification
    from unitscale_jax.train.finetune import LABELS_FILE, FineTuner
    from unitscale_jax.train.flags import parse_finetune_args
    data = write_classification(tmp_path / "cls")
    flags = [*TINY, "--d-model", "32", "--data", str(data), "--steps", "8", "--eval-every", "8"]
    assert main(["finetune", *flags, "--run-dir", str(tmp_path / "ft")]) == 0
    capsys.readouterr()
    cfg = parse_finetune_args(
        [*flags, "--run-dir", str(tmp_path / "fs"), "--distill-from", str(tmp_path / "ft"),
         "--distill-weight", "1", "--distill-temperature", "3"])
    tuner = FineTuner(cfg, quiet=True)
    tuner.build_state()
    tuner.state = {**tuner.state, "params": tuner.state["teacher"]}
    m = jax.device_get(tuner.step(next(tuner.train_it)))
    assert abs(float(m["loss"])) < 1e-6 and float(m["grad_norm"]) < 1e-4, m
    tuner.close()
    other = tmp_path / "ft_other"
    shutil.copytree(tmp_path / "ft", other)
    labels = json.loads((other / LABELS_FILE).read_text())
    labels["labels"] = ["neg", "pos"]
    (other / LABELS_FILE).write_text(json.dumps(labels))
    for src, needle in [(other, "the teacher's labels ['neg', 'pos'] differ"),
                        (teacher[0] / "teacher", "needs a 'finetune --task classify' run")]:
        rc = main(["finetune", *flags, "--run-dir", str(tmp_path / "bad"), "--distill-from",
                   str(src)])
        _one_line(capsys, rc, needle)
