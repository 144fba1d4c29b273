"""Bad input gives one clear line on stderr and a non-zero exit, never a traceback."""

import pytest

from tests.train.conftest import SMALL, run_train
from unitscale_jax.cli import main


def _one_line(capsys, rc, *needles, code=2):
    out, err = capsys.readouterr()
    assert rc == code, (rc, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_missing_data_path(capsys, tmp_path):
    rc = main(["train", "--data", str(tmp_path / "nope.txt"), "--run-dir", str(tmp_path / "r")])
    _one_line(capsys, rc, "nope.txt", "not found")


def test_glob_matching_nothing(capsys, tmp_path):
    rc = main(["train", "--data", str(tmp_path / "*.txt"), "--run-dir", str(tmp_path / "r")])
    _one_line(capsys, rc, "matches no file")


def test_empty_data_file(capsys, tmp_path):
    (tmp_path / "empty.txt").write_text("")
    rc = main(["train", "--data", str(tmp_path / "empty.txt"), "--data-dir",
               str(tmp_path / "tfds"), "--run-dir", str(tmp_path / "r")])
    _one_line(capsys, rc, "empty")


def test_corpus_shorter_than_one_sequence(capsys, tmp_path):
    (tmp_path / "short.txt").write_text("just a few words of text.\n" * 40)  # ~1 kB
    rc = main(["train", "--data", str(tmp_path / "short.txt"), "--data-dir",
               str(tmp_path / "tfds"), "--seq-len", "2048", "--run-dir", str(tmp_path / "r")])
    _one_line(capsys, rc, "fewer than one sequence", "seq_len")


def test_unknown_preset(capsys, tmp_path):
    rc = main(["train", "--preset", "tinyy", "--run-dir", str(tmp_path / "r")])
    _one_line(capsys, rc, "unknown preset 'tinyy'", "did you mean 'tiny'")


def test_unknown_option_suggests_close_match(capsys):
    rc = main(["train", "--lrr", "0.1"])
    _one_line(capsys, rc, "unknown option", "--lrr", "did you mean --lr")


@pytest.mark.parametrize("argv, needle", [
    (["--optimizer", "adagrad"], "invalid choice: 'adagrad'"),
    (["--precision", "fp4"], "invalid choice: 'fp4'"),
    (["--lr", "fast"], "'fast' is not a number"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--d-model", "30", "--n-heads", "4"], "not divisible by --n-heads"),
    (["--model", "rnn"], "invalid choice: 'rnn'"),
])
def test_bad_option_values(capsys, tmp_path, argv, needle):
    rc = main(["train", *argv, "--run-dir", str(tmp_path / "r")])
    _one_line(capsys, rc, needle)


def test_unknown_command(capsys):
    rc = main(["trian"])
    _one_line(capsys, rc, "unknown command 'trian'")


def test_sample_without_a_run(capsys, tmp_path):
    rc = main(["sample", "--run-dir", str(tmp_path / "none")])
    _one_line(capsys, rc, "no config.json")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, shared_dirs):
    """SP Adam at lr 1e25 overflows at step 3: exit 1, one line, checkpoints 1-2 kept."""
    tfds_dir, cache = shared_dirs
    run_dir = tmp_path / "nan"
    p = run_train([*SMALL, "--run-dir", run_dir, "--data-dir", tfds_dir, "--steps", "20",
                   "--parametrization", "sp", "--lr", "1e25", "--schedule", "constant",
                   "--warmup-steps", "0", "--checkpoint-every", "1", "--eval-every", "0"],
                  cache)
    assert p.returncode == 1, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert "non-finite training loss" in lines[0] and "at step 3;" in lines[0]
    assert "last good checkpoint is step 2" in lines[0]
    steps = sorted(int(d.name) for d in (run_dir / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == [1, 2]
