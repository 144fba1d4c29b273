"""Multi-process runs on this machine: 2 processes x 2 CPU devices and 4 x 1, each process the
real ``unitscale-jax train`` started by hand (``--coordinator-address``), against one process
with 4 devices: the same loss curves, each process reading its own record shards, only process
0 writing the run's files, checkpoints moving between process counts, a killed process
stopping the others, a process with another config refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.conftest import ROOT, read_rows
from tests.train.multiprocess_harness import batch_log, launch, reference_rows, run_env
from unitscale_jax.cli import main

CHECKPOINT_EVERY = 4
BASE = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--seq-len", "16",
        "--batch-size", "8", "--eval-every", "4", "--eval-batches", "1", "--checkpoint-every",
        str(CHECKPOINT_EVERY), "--schedule", "constant", "--warmup-steps", "0", "--no-progress",
        "--heartbeat-timeout", "10", "--init-timeout", "120"]
STEPS = 12
TIMEOUT = 400  # seconds per launch (a loaded 2-core machine)


def quiet(*extra):
    return [*BASE, "--no-tensorboard", "--no-plot", *map(str, extra)]


def curve(run_dir):
    rows = read_rows(run_dir)
    return {(r["split"], r["step"]): r["loss"] for r in rows}


def assert_same_curve(run_dir, ref_dir, steps):
    got, ref = curve(run_dir), curve(ref_dir)
    keys = sorted(k for k in ref if k[1] in steps)
    assert keys and sorted(k for k in got if k[1] in steps) == keys, (sorted(got), keys)
    np.testing.assert_allclose([got[k] for k in keys], [ref[k] for k in keys], rtol=2e-5,
                               atol=0, err_msg=str(run_dir))


def in_run(writes, run):
    """The paths under ``run`` (as tuples of parts; ``()``: ``run`` itself) written to."""
    return [Path(w["path"]).relative_to(run).parts for w in writes
            if Path(w["path"]).is_relative_to(run)]


def assert_ok(procs):
    for p in procs:
        assert p.rc == 0, (p.index, p.rc, p.stderr[-3000:])


def assert_shards(log_dir, ref_rows, count, steps, groups):
    """Each process read whole record shards, the rows of those shards in the single-process
    run; the processes of a tensor-parallel group (``groups``) read the same, and the groups'
    shards are disjoint and cover the batch."""
    log = batch_log(log_dir)
    assert sorted(log) == sorted(p for g in groups for p in g)
    for step in steps:
        covered = []
        for group in groups:
            lines = [log[p][step] for p in group]
            assert all(line["count"] == count for line in lines)
            assert all(line["shards"] == lines[0]["shards"] for line in lines), lines
            assert all(line["rows"] == lines[0]["rows"] for line in lines)
            want = [r for k in lines[0]["shards"] for r in ref_rows[step][k]]
            assert lines[0]["rows"] == want, (step, group)
            covered += lines[0]["shards"]
        assert sorted(covered) == list(range(count)), (step, covered)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shared_dirs):
    """Single-process runs with 4 devices: ``ref2`` and ``ref4`` (12 steps, dp, read in 2 and
    4 data shards) and ``half4`` (4 steps, fsdp_tp, 4 shards: resumed on 4 processes)."""
    base = tmp_path_factory.mktemp("mp_reference")
    runs = {"ref2": quiet("--steps", STEPS, "--data-shards", 2),
            "ref4": quiet("--steps", STEPS, "--data-shards", 4),
            "half4": quiet("--steps", 4, "--data-shards", 4, "--sharding", "fsdp_tp")}
    spec = [[str(base / name), str(base / f"{name}-log"), list(map(str, args))]
            for name, args in runs.items()]
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, str(ROOT / "tests/train/multiprocess_reference.py"),
                        json.dumps(spec)], cwd=ROOT, env=run_env(shared_dirs[1], 4),
                       capture_output=True, text=True, timeout=TIMEOUT)
    assert p.returncode == 0 and "REFERENCE OK" in p.stdout, p.stderr[-3000:]
    print(f"reference runs: {time.monotonic() - t0:.1f} s")
    out = {name: base / name for name in runs}
    out["rows2"] = reference_rows(batch_log(base / "ref2-log"), 2)
    out["rows4"] = reference_rows(batch_log(base / "ref4-log"), 4)
    return out


def test_launch_flags_checked(tmp_path, capsys):
    cases = [(["--coordinator-address", "127.0.0.1:1234"],
              "--num-processes, --process-id missing"),
             (["--coordinator-address", "127.0.0.1:1234", "--num-processes", "2",
               "--process-id", "2"], "--process-id must be in [0, 2)"),
             (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id",
               "0"], "is not HOST:PORT"),
             (["--coordinator-address", "h:99999", "--num-processes", "2", "--process-id",
               "0"], "is not HOST:PORT"),
             (["--coordinator-address", "h:1", "--num-processes", "2", "--process-id", "0",
               "--distributed", "off"], "cannot go with --distributed off"),
             (["--heartbeat-timeout", "0"], "--heartbeat-timeout must be >= 1"),
             (["--data-shards", "3"], "--data-shards must be >= 1 and divide --batch-size")]
    for i, (args, message) in enumerate(cases):
        rc = main(["train", *quiet("--steps", 2, "--run-dir", tmp_path / str(i)), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], (args, err)
        assert not (tmp_path / str(i)).exists()


def test_two_processes_then_one(tmp_path, shared_dirs, reference):
    """2 x 2 devices (dp, default data shards: one per process) for 4 steps, then the same
    run resumed by one process with 4 devices to step 12: the single-process curve; process 1
    writes nothing in the run directory but its share of the orbax checkpoints."""
    run, logs = tmp_path / "run", tmp_path / "batches"
    args = [*BASE, "--run-dir", str(run)]  # with TensorBoard and the plot
    t0 = time.monotonic()
    procs = launch(2, 2, [*args, "--steps", 4], tmp_path / "two", shared_dirs[1],
                   batch_log=logs, timeout=TIMEOUT)
    two_s = time.monotonic() - t0
    assert_ok(procs)
    assert_same_curve(run, reference["ref2"], range(0, 5))
    assert_shards(logs, reference["rows2"], 2, range(1, 5), [[0], [1]])
    assert "step 4: validation" in procs[0].stdout and "done: 4 steps" in procs[0].stdout
    assert "validation" not in procs[1].stdout and "done" not in procs[1].stdout
    assert {"config.json", "metrics.jsonl", "summary.json", "loss.png",
            "tensorboard"} <= {w[0] for w in in_run(procs[0].writes, run) if w}
    # process 1: creating the (existing) run directory, its checkpoint shards
    others = [w for w in in_run(procs[1].writes, run) if w and w[0] != "checkpoints"]
    assert others == [], others
    assert len(list((run / "tensorboard").rglob("events.out.tfevents*"))) == 1
    steps = [(r["split"], r["step"]) for r in read_rows(run)]
    assert len(steps) == len(set(steps))  # every row once

    t0 = time.monotonic()
    one = launch(1, 4, [*args, "--steps", STEPS], tmp_path / "one", shared_dirs[1],
                 timeout=TIMEOUT)
    one_s = time.monotonic() - t0
    assert_ok(one)
    assert "resumed from the checkpoint at step 4" in one[0].stdout
    assert_same_curve(run, reference["ref2"], range(0, STEPS + 1))
    print(f"2x2 run: {two_s:.1f} s; 1x4 resume: {one_s:.1f} s")


def test_one_process_then_four(tmp_path, shared_dirs, reference):
    """A one-process fsdp_tp run (4 data shards) resumed on 4 processes x 1 device: the
    tensor-parallel pairs (0, 1) and (2, 3) read the same two shards; the curve is the
    single-process one."""
    run, logs = tmp_path / "run", tmp_path / "batches"
    import shutil
    shutil.copytree(reference["half4"], run)
    t0 = time.monotonic()
    procs = launch(4, 1, quiet("--steps", STEPS, "--data-shards", 4, "--sharding", "fsdp_tp",
                               "--run-dir", run), tmp_path / "four", shared_dirs[1],
                   batch_log=logs, timeout=TIMEOUT)
    four_s = time.monotonic() - t0
    assert_ok(procs)
    assert "resumed from the checkpoint at step 4" in procs[0].stdout
    assert_same_curve(run, reference["ref4"], range(0, STEPS + 1))
    assert_shards(logs, reference["rows4"], 4, range(5, STEPS + 1), [[0, 1], [2, 3]])
    print(f"4x1 resume: {four_s:.1f} s")


def test_killed_process_stops_the_others_and_the_rerun_resumes(tmp_path, shared_dirs,
                                                               reference):
    """SIGKILL of process 1 of 2 (fsdp) after the first checkpoint: process 0 exits non-zero
    within the bound, saying a peer died; the same command on both resumes from the last
    complete checkpoint and gives the uninterrupted curve."""
    run, logs = tmp_path / "run", tmp_path / "batches"
    args = quiet("--steps", STEPS, "--sharding", "fsdp", "--no-async-checkpointing",
                 "--run-dir", run)
    killed = {}

    def kill_after_first_checkpoint(procs):
        # Process 1 is frozen (SIGSTOP) first, at a step that is neither a checkpoint step nor
        # the one before it. Process 0 cannot then be more than a step ahead, so within the
        # second it waits it is blocked in that step's collective, never in a checkpoint's
        # barrier (a death seen there is JAX's heartbeat check's to report, after
        # --heartbeat-timeout, see unitscale_jax.train.distributed). The
        # SIGKILL then fails that collective.
        if killed or not (run / "checkpoints" / "4").is_dir():
            return
        log = logs / "process-1.jsonl"
        if not (log.exists() and any(json.loads(x)["step"] >= 5
                                     for x in log.read_text().splitlines())):
            return
        os.kill(procs[1].pid, signal.SIGSTOP)
        at = max(json.loads(x)["step"] for x in log.read_text().splitlines() if x.strip())
        if at % CHECKPOINT_EVERY in (0, CHECKPOINT_EVERY - 1):
            os.kill(procs[1].pid, signal.SIGCONT)  # try again at the next poll
            return
        time.sleep(1.0)
        os.kill(procs[1].pid, signal.SIGKILL)
        killed["at"], killed["step"] = time.monotonic(), at
        killed["complete"] = sorted(int(p.name) for p in (run / "checkpoints").iterdir()
                                    if p.name.isdigit())

    procs = launch(2, 2, args, tmp_path / "killed", shared_dirs[1], batch_log=logs,
                   timeout=TIMEOUT, watch=kill_after_first_checkpoint, poll=0.05)
    assert killed, "the run ended before process 1 was killed"
    assert procs[1].rc == -signal.SIGKILL
    assert procs[0].rc != 0
    waited = procs[0].ended - killed["at"]
    assert waited < 60, waited
    assert "another process has most likely died" in procs[0].stderr, procs[0].stderr[-2000:]
    last = max(killed["complete"])
    assert 4 <= last < STEPS

    again = launch(2, 2, args, tmp_path / "again", shared_dirs[1], timeout=TIMEOUT)
    assert_ok(again)
    assert f"resumed from the checkpoint at step {last}" in again[0].stdout
    assert_same_curve(run, reference["ref2"], range(0, STEPS + 1))
    print(f"killed run: process 0 exited {waited:.1f} s after the kill")


def test_different_config_refused(tmp_path, shared_dirs):
    run = tmp_path / "run"
    procs = launch(2, 1, quiet("--steps", 4, "--run-dir", run), tmp_path / "mismatch",
                   shared_dirs[1], per_process=lambda i: ["--lr", "0.5"] if i else [],
                   timeout=TIMEOUT)
    for p in procs:
        assert p.rc == 2, (p.index, p.rc, p.stderr[-2000:])
        line = [x for x in p.stderr.splitlines() if x.startswith("unitscale-jax: error:")]
        assert len(line) == 1 and "different configs" in line[0], p.stderr[-2000:]
        assert "optimizer.lr 1.0 vs 0.5" in line[0], line
    assert not run.exists() or not any(run.iterdir())
