"""Killing a run (a real SIGKILL mid-training or mid-save, SIGTERM) or corrupting its newest
checkpoint, then rerunning the same command, reproduces the uninterrupted run's curves
exactly (CPU)."""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.train.conftest import (
    ROOT,
    SMALL,
    curves,
    read_rows,
    run_train,
    subprocess_env,
    train_cmd,
)
from unitscale_jax.train.checkpoint import TMP_MARKER

STEPS = 60


def _args(tfds_dir, run_dir):
    return [*SMALL, "--data-dir", tfds_dir, "--steps", STEPS, "--eval-every", "10",
            "--checkpoint-every", "10", "--keep-checkpoints", "3", "--run-dir", run_dir]


def _ckpt_steps(run_dir):
    return sorted(int(p.name) for p in (Path(run_dir) / "checkpoints").iterdir()
                  if p.name.isdigit())


def _resumed_at(stdout):
    m = re.search(r"resumed from the checkpoint at step (\d+)", stdout)
    assert m, stdout
    return int(m.group(1))


def _wait_for_step(proc, run_dir, step, timeout=240):
    """Polls metrics.jsonl until a training row of ``step`` or later appears."""
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and any(r["step"] >= step for r in read_rows(run_dir)
                                    if r["split"] == "train"):
            return
        time.sleep(0.01)
    raise AssertionError(f"the run never reached step {step} (exit {proc.poll()})")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_dirs):
    """The uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("resume") / "ref"
    p = run_train(_args(shared_dirs[0], run_dir), shared_dirs[1])
    assert p.returncode == 0, p.stderr
    train_curve, val_curve = curves(run_dir)
    assert [s for s, *_ in train_curve] == list(range(1, STEPS + 1))
    assert [s for s, _ in val_curve] == list(range(0, STEPS + 1, 10))
    return run_dir, (train_curve, val_curve)


def test_sigkill_mid_training_then_rerun_matches(reference, tmp_path, shared_dirs):
    tfds_dir, cache = shared_dirs
    run_dir = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(*_args(tfds_dir, run_dir)), cwd=ROOT,
                            env=subprocess_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _wait_for_step(proc, run_dir, 25)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = max(r["step"] for r in read_rows(run_dir))
    assert 25 <= done < STEPS, done  # really killed in the middle

    p = run_train(_args(tfds_dir, run_dir), cache)
    assert p.returncode == 0, p.stderr
    assert 10 <= _resumed_at(p.stdout) <= done  # checkpoint 20 may still have been in flight
    assert curves(run_dir) == reference[1]


def test_sigterm_saves_a_checkpoint_and_rerun_matches(reference, tmp_path, shared_dirs):
    """SIGTERM (a preemption notice) finishes the step, checkpoints it and exits 1."""
    tfds_dir, cache = shared_dirs
    run_dir = tmp_path / "terminated"
    proc = subprocess.Popen(train_cmd(*_args(tfds_dir, run_dir)), cwd=ROOT,
                            env=subprocess_env(cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _wait_for_step(proc, run_dir, 15)
    os.kill(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    m = re.fullmatch(r".*stopped: SIGTERM received at step (\d+): checkpoint saved at step "
                     r"\1; rerun the same command to resume\.", err.strip())
    assert m, err
    stopped = int(m.group(1))
    assert 15 <= stopped < STEPS and stopped in _ckpt_steps(run_dir)

    p = run_train(_args(tfds_dir, run_dir), cache)
    assert p.returncode == 0, p.stderr
    assert _resumed_at(p.stdout) == stopped
    assert curves(run_dir) == reference[1]


def _kill_while_saving(proc, run_dir, step, timeout=240):
    """SIGKILLs ``proc`` as soon as orbax's temporary directory of checkpoint ``step`` holds a
    file (the save under way, the rename to the final name not yet done)."""
    tmp = Path(run_dir) / "checkpoints" / f"{step}{TMP_MARKER}"
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            if any(tmp.rglob("*")):
                os.kill(proc.pid, signal.SIGKILL)
                return
        except FileNotFoundError:  # renamed or not created yet
            pass
        time.sleep(0.001)
    proc.kill()
    raise AssertionError(f"never saw checkpoint {step} being written (exit {proc.poll()})")


def test_sigkill_mid_save_then_rerun_matches(reference, tmp_path, shared_dirs):
    """A real SIGKILL while checkpoint 30 is being written leaves its temporary directory;
    the rerun reports and removes it and resumes from checkpoint 20."""
    tfds_dir, cache = shared_dirs
    run_dir = tmp_path / "killed_saving"
    proc = subprocess.Popen(train_cmd(*_args(tfds_dir, run_dir)), cwd=ROOT,
                            env=subprocess_env(cache), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    _kill_while_saving(proc, run_dir, 30)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert _ckpt_steps(run_dir) == [10, 20]
    partial = list((run_dir / "checkpoints").glob(f"30{TMP_MARKER}*"))
    assert partial and any(partial[0].rglob("*"))  # written, never committed

    p = run_train(_args(tfds_dir, run_dir), cache)
    assert p.returncode == 0, p.stderr
    assert "ignoring incomplete checkpoint 30" in p.stdout
    assert _resumed_at(p.stdout) == 20
    assert not list((run_dir / "checkpoints").glob(f"*{TMP_MARKER}*"))
    assert curves(run_dir) == reference[1]


def test_corrupt_checkpoint_is_skipped_never_loaded(reference, tmp_path, shared_dirs):
    tfds_dir, cache = shared_dirs
    run_dir = tmp_path / "corrupt"
    shutil.copytree(reference[0], run_dir)
    assert _ckpt_steps(run_dir) == [40, 50, 60]
    files = [f for f in (run_dir / "checkpoints" / "60" / "state").rglob("*") if f.is_file()]
    biggest = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 64):
        data[i] ^= 0xFF
    biggest.write_bytes(bytes(data))

    p = run_train(_args(tfds_dir, run_dir), cache)
    assert p.returncode == 0, p.stderr
    assert "step 60" in p.stdout and "corrupt" in p.stdout and "skipping" in p.stdout
    assert _resumed_at(p.stdout) == 50
    assert list((run_dir / "corrupt_checkpoints").iterdir())
    assert _ckpt_steps(run_dir) == [40, 50, 60]
    assert curves(run_dir) == reference[1]


def test_sigterm_in_process_raises_interrupted_not_diverged(tmp_path, shared_dirs):
    """A caller (a sweep that records diverged runs and goes on) can tell an interrupted run
    from a diverged one: SIGTERM raises ``Interrupted``, which is a ``TrainingStopped`` but not
    a ``Diverged`` (a non-finite loss raises ``Diverged``: test_precision_modes)."""
    import threading

    from unitscale_jax import train
    run_dir = tmp_path / "r"
    cfg = train.get_preset("tiny").replace(
        model={"d_model": 16, "n_layers": 1, "n_heads": 2},
        data={"seq_len": 16, "data_dir": shared_dirs[0]},
        training={"steps": 3000, "batch_size": 4, "eval_every": 0, "log_every": 1,
                  "run_dir": str(run_dir), "progress": False, "tensorboard": False,
                  "plot": False, "checkpoint": False})

    def kill_when_training():
        # the handler is installed before the first training row is written
        deadline = time.time() + 120
        while time.time() < deadline:
            if (run_dir / "metrics.jsonl").exists() and any(
                    r["split"] == "train" for r in read_rows(run_dir)):
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.01)

    before = signal.getsignal(signal.SIGTERM)
    killer = threading.Thread(target=kill_when_training, daemon=True)
    killer.start()
    with pytest.raises(train.Interrupted, match="SIGTERM received at step") as e:
        train.run(cfg, quiet=True)
    killer.join(5)
    assert isinstance(e.value, train.TrainingStopped)
    assert not isinstance(e.value, train.Diverged)
    assert signal.getsignal(signal.SIGTERM) == before  # the run put the old handler back
