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

from unitscale_jax.train.config import Config, differences
from unitscale_jax.train.errors import UsageError

OUTPUTS = ("checkpoints", "corrupt_checkpoints", "tensorboard", "metrics.jsonl", "config.json",
           "loss.png", "summary.json", "labels.json", "dev_report.json", "test_report.json",
           "confusion.png", "test_confusion.png", "report.json", "report_confusion.png")
"""What a run writes in its directory (``--overwrite`` deletes these)."""


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
    """
    run_dir = Path(cfg.training.run_dir)
    cfg_path = run_dir / "config.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file, not a directory; pass a directory "
                         "(it is created if missing).")
    if cfg.training.overwrite and run_dir.exists() and jax.process_index() == 0:
        for name in OUTPUTS:
            p = run_dir / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    if cfg_path.exists():
        try:
            old = Config.from_dict(json.loads(cfg_path.read_text()))
        except (json.JSONDecodeError, UsageError, TypeError) as e:
            raise UsageError(f"{cfg_path} is not a valid run config ({e}); pass --overwrite to "
                             "start a new run there, or another --run-dir.") from None
        diff = differences(old, given)
        if diff:
            raise UsageError(f"{run_dir} holds a run with a different config ({'; '.join(diff)}); "
                             "rerun with the same options to resume it, or pass --overwrite or "
                             "another --run-dir.")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def read_run_config(run_dir: str | Path, flag: str = "--run-dir") -> Config:
    """The saved (unresolved) ``config.json`` of a run directory.

    Raises:
      UsageError: no directory, no ``config.json``, or one that is not a run config.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"{flag} {run_dir} is a file; pass a run directory (one that "
                         "'unitscale-jax train --run-dir ...' wrote).")
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise UsageError(f"{flag} {run_dir}: no config.json there; train a run first "
                         "(unitscale-jax train --run-dir ...).")
    try:
        return Config.from_dict(json.loads(cfg_path.read_text()))
    except (json.JSONDecodeError, UsageError, TypeError, AttributeError) as e:
        raise UsageError(f"{flag} {run_dir}: {cfg_path.name} is not a valid run config "
                         f"({e}).") from None


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
