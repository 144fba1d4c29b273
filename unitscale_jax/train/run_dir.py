"""The run directory, one-line reports and stop signals of a training run.

``prepare_run_dir`` checks that a directory holding a run holds *this* run (the same config
up to ``RESUMABLE_CHANGES``) before it is resumed, and clears it for ``--overwrite``.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from pathlib import Path
from typing import Optional

import jax

from unitscale_jax import paths
from unitscale_jax.train.config import Config, differences
from unitscale_jax.train.errors import UsageError

OUTPUTS = {"checkpoints": "dir", "corrupt_checkpoints": "dir", "tensorboard": "dir",
           "metrics.jsonl": "file", "config.json": "file", "loss.png": "file",
           "summary.json": "file", "labels.json": "file", "dev_report.json": "file",
           "test_report.json": "file", "confusion.png": "file", "test_confusion.png": "file",
           "report.json": "file", "report_confusion.png": "file"}
"""What a run writes in its directory, and the kind of each (``--overwrite`` deletes these)."""


class Log:
    """Prints one-line reports on the primary process without breaking the progress bar."""

    def __init__(self, enabled: bool, quiet: bool = False):
        self.enabled, self.quiet, self.bar = enabled, quiet, None

    def __call__(self, msg: str) -> None:
        if not self.enabled or self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)


def prepare_run_dir(cfg: Config, given: Config) -> Path:
    """Creates ``cfg.training.run_dir`` (emptied first with ``--overwrite``).

    Raises:
      UsageError: the directory holds another run, or an unreadable ``config.json``.
      PathError: ``run_dir`` cannot be created or written in, or it holds a file where the run
        writes a directory (or the reverse), as an interrupted or foreign run may leave.
    """
    another = "pass another --run-dir"
    # the other processes of a multi-process run write only their checkpoint shards
    run_dir = paths.output_dir(cfg.training.run_dir, "--run-dir", another,
                               probe=jax.process_index() == 0)
    cfg_path = run_dir / "config.json"
    if cfg.training.overwrite and jax.process_index() == 0:
        for name in OUTPUTS:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    again = "pass --overwrite to start a new run there, or another --run-dir"
    for name, kind in OUTPUTS.items():
        paths.check_kind(run_dir / name, kind, fix=again)
    if cfg_path.exists():
        try:
            old = Config.from_dict(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, UsageError, TypeError,
                AttributeError, OSError) as e:
            raise UsageError(f"{cfg_path} is not a valid run config ({e}); {again}.") from None
        diff = differences(old, given)
        if diff:
            raise UsageError(f"{run_dir} holds a run with a different config ({'; '.join(diff)}); "
                             "rerun with the same options to resume it, or pass --overwrite or "
                             "another --run-dir.")
    return run_dir


def read_run_config(run_dir: str | Path, flag: str = "--run-dir") -> Config:
    """The saved (unresolved) ``config.json`` of a run directory.

    Raises:
      PathError: ``run_dir`` is a file, or its ``config.json`` a directory.
      UsageError: no ``config.json``, or one that is not a run config.
    """
    run_dir = paths.check_kind(run_dir, "dir", flag, "pass the run directory (it holds "
                               "config.json and checkpoints/)")
    cfg_path = run_dir / "config.json"
    if not cfg_path.exists():
        raise UsageError(f"{flag} {run_dir}: no config.json there; train a run first "
                         "(unitscale-jax train --run-dir ...).")
    fix = "pass the directory of a complete run, or train it again with --overwrite"
    paths.check_kind(cfg_path, "file", fix=fix)
    try:
        return Config.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, UsageError, TypeError, AttributeError,
            OSError) as e:
        raise UsageError(f"{cfg_path} is not a valid run config ({e}); {fix}.") from None


class StopSignals:
    """SIGINT / SIGTERM (Ctrl-C, a cluster's preemption notice) end the run cleanly: the loop
    finishes its step, saves a checkpoint and stops. A second SIGINT interrupts at once.

    Installed only in the main thread; ``restore`` puts the previous handlers back.
    """

    def __init__(self):
        self.received: Optional[str] = None
        self._old = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old = {}
