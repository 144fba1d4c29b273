"""``unitscale-jax finetune | evaluate | predict`` on bad input (one line, exit 2, nothing
written) and after a SIGKILL (rerunning the same command gives the uninterrupted run)."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.train.conftest import ROOT, read_rows, subprocess_env
from tests.train.finetune_helpers import TINY, fails, write_classification, write_tagging
from unitscale_jax.data import train_tokenizer
from unitscale_jax.train.config import Config
from unitscale_jax.train.finetune import LabelledData
from unitscale_jax.train.flags import parse_finetune_args


def _finetune(tmp_path, *args):
    return ["finetune", *TINY, "--steps", "2", "--run-dir", str(tmp_path / "run"), *args]


def _tsv(path, header, rows):
    path.write_text("\n".join(["\t".join(header)] + ["\t".join(r) for r in rows]) + "\n")
    return path


def test_missing_label_and_text_columns_name_the_columns_found(tmp_path, capsys):
    train = _tsv(tmp_path / "train.tsv", ["sentence", "score"], [["good", "1"], ["bad", "0"]])
    dev = _tsv(tmp_path / "dev.tsv", ["sentence", "label"], [["fine", "1"]])
    fails(capsys, _finetune(tmp_path, "--train", str(train), "--dev", str(dev)),
           "train.tsv", "no label column", "'sentence', 'score'", "--label-column")
    fails(capsys, _finetune(tmp_path, "--train", str(train), "--dev", str(dev),
                             "--label-column", "score", "--text-column", "txt"),
           "no text column 'txt'", "'sentence', 'score'")


def test_empty_file(tmp_path, capsys):
    data = write_classification(tmp_path / "d")
    (data / "dev.tsv").write_text("")
    fails(capsys, _finetune(tmp_path, "--data", str(data)), "dev.tsv", "empty file")


@pytest.mark.parametrize("line, needles", [
    ("rome B-LOC extra", ["train.conll:4:", "3 column(s)", "expected 2"]),
    ("rome X-LOC", ["train.conll:4:", "'X-LOC' is not in the IOB2 scheme"]),
    ("rome I-LOC", ["train.conll:4:", "'I-LOC' continues no entity"]),
])
def test_bad_conll_lines_name_file_and_line(tmp_path, capsys, line, needles):
    train = tmp_path / "train.conll"
    train.write_text(f"ann B-PER\nwent O\n\n{line}\ncity O\n")
    dev = write_tagging(tmp_path / "d") / "dev.conll"
    fails(capsys, _finetune(tmp_path, "--task", "tag", "--train", str(train), "--dev",
                             str(dev)), *needles)


def test_dev_label_never_seen_in_training(tmp_path, capsys):
    data = write_classification(tmp_path / "d", test=False)
    with open(data / "dev.tsv", "a") as f:
        f.write("so so\t2\n")
    fails(capsys, _finetune(tmp_path, "--data", str(data)), "dev.tsv:26:", "label '2' never "
           "occurs in the training split")


def test_long_texts_are_truncated_and_counted_or_refused(tmp_path, capsys):
    data = write_classification(tmp_path / "d", test=False)
    with open(data / "train.tsv", "a") as f:
        f.write("a very long sentence indeed, much longer than the rows\t1\n" * 3)
    notes = []
    cfg = parse_finetune_args(["--data", str(data), "--seq-len", "30"])
    LabelledData(cfg, log=notes.append)
    assert any(n.startswith(f"{data / 'train.tsv'}: truncated 3 of 67 examples longer than "
                            "--seq-len 30") for n in notes), notes
    fails(capsys, _finetune(tmp_path, "--data", str(data), "--seq-len", "30", "--no-truncate"),
           "train.tsv:66:", "3 example(s) longer than --seq-len 30", "--no-truncate")


def _fake_run(path, cfg: Config):
    path.mkdir(parents=True)
    (path / "config.json").write_text(cfg.to_json())
    return path


def test_init_from_a_non_encoder_or_mismatched_run(tmp_path, capsys):
    data = write_classification(tmp_path / "d", test=False)
    decoder = _fake_run(tmp_path / "dec", Config())
    fails(capsys, _finetune(tmp_path, "--data", str(data), "--init-from", str(decoder)),
           "is a decoder run", "needs a pretrained encoder run")
    fails(capsys, _finetune(tmp_path, "--data", str(data), "--init-from", str(tmp_path / "no")),
           "--init-from", "does not exist; pass a run directory")
    tok = tmp_path / "tok.json"
    (tmp_path / "text.txt").write_text("the film was good and the plot was bad\n" * 20)
    train_tokenizer([str(tmp_path / "text.txt")], kind="wordpiece", vocab_size=60,
                    out_path=str(tok))
    encoder = _fake_run(tmp_path / "enc", Config().replace(model={
        "kind": "encoder", "d_model": 16, "n_layers": 1, "n_heads": 2}))  # TINY's but d_model
    line = fails(capsys, _finetune(tmp_path, "--data", str(data), "--init-from", str(encoder),
                                    "--d-model", "32", "--tokenizer", f"hf:{tok}"),
                  "the pretrained encoder differs", "d_model 16 (pretrained) vs 32",
                  f"tokenizer 'bytes' (pretrained) vs 'hf:{tok}'")
    assert "n_layers" not in line  # only the fields that differ


def test_tokenizer_missing_or_not_a_tokenizer(tmp_path, capsys):
    data = write_classification(tmp_path / "d", test=False)
    fails(capsys, _finetune(tmp_path, "--data", str(data), "--tokenizer",
                             f"hf:{tmp_path / 'nope.json'}"), "--tokenizer", "no such file")
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    fails(capsys, _finetune(tmp_path, "--data", str(data), "--tokenizer",
                             f"hf:{tmp_path / 'bad.json'}"), "is not a Hugging Face tokenizer")


def test_run_dir_that_is_a_file(tmp_path, capsys):
    data = write_classification(tmp_path / "d", test=False)
    (tmp_path / "file").write_text("x")
    fails(capsys, ["finetune", "--data", str(data), "--run-dir", str(tmp_path / "file")],
           "is a file, not a directory")


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_predict_need_a_finetuning_run(tmp_path, capsys, command):
    data = write_classification(tmp_path / "d", test=False)
    run = _fake_run(tmp_path / "pre", Config().replace(model={"kind": "encoder"}))
    out = tmp_path / "out.tsv"
    out.write_text("keep me\n")
    fails(capsys, [command, "--run-dir", str(run), "--data", str(data / "dev.tsv"),
                    "--out", str(out)], "is not a fine-tuning run")
    fails(capsys, [command, "--run-dir", str(tmp_path / "none"), "--data",
                    str(data / "dev.tsv"), "--out", str(out)], "no config.json there")
    assert out.read_text() == "keep me\n"


# --------------------------------------------------------------------------- resumption

STEPS = 200


def _cmd(data, run_dir):
    return [sys.executable, "-m", "unitscale_jax.cli", "finetune", "--data", str(data), *TINY,
            "--steps", str(STEPS), "--eval-every", "20", "--keep-checkpoints", "2",
            "--run-dir", str(run_dir)]


def _curves(run_dir):
    rows = read_rows(run_dir)
    return ([(r["step"], r["loss"], r["grad_norm"]) for r in rows if r["split"] == "train"],
            [(r["step"], r["loss"], r["accuracy"]) for r in rows if r["split"] == "validation"])


def test_sigkill_then_rerun_matches_the_uninterrupted_run(tmp_path, shared_dirs):
    data = write_classification(tmp_path / "d", n_train=96)
    env = subprocess_env(shared_dirs[1])
    ref = subprocess.run(_cmd(data, tmp_path / "ref"), cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(data, killed), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    while proc.poll() is None:
        if metrics.exists() and any(r["step"] >= 70 for r in read_rows(killed)):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert max(r["step"] for r in read_rows(killed)) < STEPS  # really killed in the middle
    again = subprocess.run(_cmd(data, killed), cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert "resumed from the checkpoint at step" in again.stdout
    assert _curves(killed) == _curves(tmp_path / "ref")
    for name in ("dev_report.json", "test_report.json"):
        assert (killed / name).read_text() == (tmp_path / "ref" / name).read_text().replace(
            str(tmp_path / "ref"), str(killed))
