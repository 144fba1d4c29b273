"""Starts the processes of one local multi-process run of the real ``unitscale-jax train``.

``launch(n, devices, args, ...)`` runs ``python -m unitscale_jax.cli train ARGS
--coordinator-address 127.0.0.1:PORT --num-processes n --process-id i`` for every ``i`` (a free
loopback port; ``devices`` CPU devices per process, gloo collectives), each under
``audit_writes.py``, which records every file the process opens for writing, creates, renames
or removes. Every process is bounded by a timeout; all are killed when one of them is, or when
the harness fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from tests.train.conftest import ROOT, subprocess_env

AUDIT = ROOT / "tests/train/audit_writes.py"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Process:
    """One finished process: exit status, output, the seconds it ran, what it wrote."""

    index: int
    rc: int
    stdout: str
    stderr: str
    seconds: float
    ended: float  # time.monotonic() when it was seen to exit
    writes: list


def run_env(cache_dir: str, devices: int, batch_log: Optional[Path] = None) -> dict:
    env = subprocess_env(cache_dir)
    env.update({"JAX_NUM_CPU_DEVICES": str(devices), "PYTHONUNBUFFERED": "1"})
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    if batch_log is not None:
        env["UNITSCALE_JAX_BATCH_LOG"] = str(batch_log)
    return env


def launch(n: int, devices: int, args: list, work: Path, cache_dir: str, *,
           timeout: float = 240, per_process: Optional[Callable[[int], list]] = None,
           batch_log: Optional[Path] = None,
           watch: Optional[Callable[[list], None]] = None, poll: float = 0.2) -> list[Process]:
    """Runs the ``n`` processes to the end (``n == 1``: a plain single-process run).

    Args:
      per_process: extra arguments of process ``i``.
      watch: called about every ``poll`` seconds with the running ``Popen`` objects (e.g. to
        kill one).
    """
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = run_env(cache_dir, devices, batch_log)
    procs, files = [], []
    t0 = time.monotonic()
    try:
        for i in range(n):
            launch_args = ([] if n == 1 else ["--coordinator-address", f"127.0.0.1:{port}",
                                              "--num-processes", str(n), "--process-id", str(i)])
            cmd = [sys.executable, str(AUDIT), str(work / f"writes-{i}.jsonl"), "train",
                   *map(str, args), *launch_args, *map(str, (per_process or (lambda i: []))(i))]
            out, err = open(work / f"out-{i}.txt", "w"), open(work / f"err-{i}.txt", "w")
            files += [out, err]
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err,
                                          start_new_session=True))
        ended = [None] * n
        while any(e is None for e in ended):
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{n}-process run still going after {timeout} s: "
                                   + _tails(work, n))
            if watch is not None:
                watch(procs)
            for i, p in enumerate(procs):
                if ended[i] is None and p.poll() is not None:
                    ended[i] = time.monotonic()
            time.sleep(poll)
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in files:
            f.close()
    return [Process(i, p.returncode, (work / f"out-{i}.txt").read_text(),
                    (work / f"err-{i}.txt").read_text(), ended[i] - t0, ended[i],
                    _writes(work / f"writes-{i}.jsonl")) for i, p in enumerate(procs)]


def _writes(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tails(work: Path, n: int) -> str:
    return " | ".join(f"process {i}: " + (work / f"err-{i}.txt").read_text()[-1500:]
                      for i in range(n))


def batch_log(directory: Path) -> dict[int, dict[int, dict]]:
    """``{process: {step: line}}`` of the ``UNITSCALE_JAX_BATCH_LOG`` files (the last line of
    a step wins: a resumed run reads the step again)."""
    out: dict[int, dict[int, dict]] = {}
    for path in sorted(directory.glob("process-*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            out.setdefault(row["process"], {})[row["step"]] = row
    return out


def reference_rows(ref: dict[int, dict], count: int) -> dict[int, list[list[str]]]:
    """``{step: rows of each of the count shards}`` of a single-process run's batch log."""
    out = {}
    for step, row in ref[0].items():
        assert row["count"] == count and row["shards"] == list(range(count))
        per = len(row["rows"]) // count
        out[step] = [row["rows"][k * per:(k + 1) * per] for k in range(count)]
    return out
