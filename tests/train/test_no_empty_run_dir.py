"""A command that fails on bad input leaves no empty --run-dir behind (and never deletes a
file that was there)."""

from __future__ import annotations

import pytest

from unitscale_jax import paths

from .finetune_helpers import fails, write_classification


def test_finetune_bad_data_leaves_no_run_dir(tmp_path, capsys):
    data = write_classification(tmp_path / "data", test=False)
    (data / "dev.tsv").write_text("sentence\tlabel\nc\t7\n")  # a label never seen in training
    run = tmp_path / "runs" / "new" / "ft"
    fails(capsys, ["finetune", "--task", "classify", "--data", str(data), "--run-dir", str(run),
                   "--steps", "2"], "'7'")
    assert not (tmp_path / "runs").exists()  # the parents it created went too


def test_train_bad_init_from_leaves_no_run_dir(tmp_path, capsys):
    bad = tmp_path / "weights.safetensors"
    bad.write_bytes(b"not safetensors")
    run = tmp_path / "run"
    fails(capsys, ["train", "--preset", "tiny", "--steps", "2", "--run-dir", str(run),
                   "--init-from", str(bad), "--no-progress"])
    assert not run.exists()


def test_existing_dir_and_files_are_kept(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    data = tmp_path / "missing.tsv"
    fails(capsys, ["finetune", "--task", "classify", "--train", str(data), "--dev", str(data),
                   "--run-dir", str(run), "--steps", "2"])
    assert (run / "notes.txt").read_text() == "mine"


def test_removed_if_left_empty_keeps_files(tmp_path):
    root = tmp_path / "a"
    created = paths.first_missing(root / "b" / "c")
    assert created == root
    with pytest.raises(RuntimeError), paths.removed_if_left_empty(created):
        (root / "b" / "c").mkdir(parents=True)
        (root / "b" / "keep.txt").write_text("x")
        (root / "b" / "c" / "d").mkdir()
        raise RuntimeError("boom")
    assert (root / "b" / "keep.txt").exists() and not (root / "b" / "c").exists()
    assert paths.first_missing(tmp_path) is None
    with pytest.raises(RuntimeError), paths.removed_if_left_empty(None):
        raise RuntimeError("nothing to remove")
