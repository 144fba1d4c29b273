"""Checkpoints: an orbax ``CheckpointManager`` (async saves, keep the latest N) plus checks.

A checkpoint at step ``s`` (the state after ``s`` optimizer steps) is one directory
``<run_dir>/checkpoints/<s>`` with three items:

- ``state``: the train state pytree (model parameters, optimizer state, step, PRNG key data),
  restored straight into the run's shardings;
- ``data``: the data pipeline's position (``DataIterator.get_state()``, JSON);
- ``meta``: JSON with the step and a SHA-256 digest of every state array.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a
run killed during a save leaves a ``*.orbax-checkpoint-tmp*`` directory: it is reported and
removed, never read. A complete checkpoint whose restore fails or whose digest does not
match (a corrupt file) is reported, moved to ``<run_dir>/corrupt_checkpoints`` and skipped;
the previous one is tried. With ``best_metric`` (fine-tuning), each save may carry metrics
(orbax's ``metrics`` item): the checkpoint with the highest value of that metric is kept as
well as the latest N (``BestN`` next to ``LatestN``) and ``best_step`` names it. Readers of a
run (``sample``, ``export``, ``evaluate``) open it ``read_only``: they skip what is incomplete
or corrupt the same way but change nothing on disk, so they work on a run they may not write
to, and never delete the temporary directory of a save that a training run is making at that
moment. The digest is computed on the host and so needs fully addressable arrays (one
process); multi-process runs skip it and rely on orbax's own checks.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

TMP_MARKER = ".orbax-checkpoint-tmp"


def state_digest(state: Any) -> Optional[str]:
    """SHA-256 over the bytes, dtypes and shapes of every leaf (None if not addressable)."""
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    if any(isinstance(x, jax.Array) and not x.is_fully_addressable for _, x in leaves):
        return None
    h = hashlib.sha256()
    for path, x in leaves:
        a = np.asarray(jax.device_get(x))
        h.update(jax.tree_util.keystr(path).encode())
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


class _DropReadOnlyNotice(logging.Filter):
    """Drops orbax's warning "Given directory is read only" that every ``read_only``
    ``CheckpointManager`` logs (reading a run is not worth a warning)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


_READ_ONLY_FILTER = _DropReadOnlyNotice()


def failure(e: BaseException) -> str:
    """``"ErrorType: first line of the message"`` of a failed restore, for one-line reports."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__


class Checkpoints:
    """Saves and restores train state + data state under ``directory``.

    Args:
      directory: the checkpoint root (created if missing).
      keep: how many of the latest checkpoints to keep (orbax ``LatestN`` preservation).
      async_save: write in a background thread (``enable_async_checkpointing``).
      log: function receiving one-line reports (partial / corrupt checkpoints).
      best_metric: keep also the checkpoint whose saved ``metrics[best_metric]`` is highest.
      read_only: only restore: the directory must exist; nothing in it is created, removed or
        moved (``save`` must not be called).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True,
                 log: Callable[[str], None] = print, best_metric: Optional[str] = None,
                 read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.log = log
        self.best_metric = best_metric
        self.read_only = read_only
        self.skipped: list[str] = []
        """What was found unusable, one phrase each (``"step 3 (corrupt or incomplete: ...)"``)."""
        best = {}
        policy = ocp.checkpoint_managers.LatestN(n=keep)
        if best_metric is not None:
            def metric(m):
                return float(m[best_metric])

            policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, (
                ocp.checkpoint_managers.BestN(get_metric_fn=metric, n=1,
                                              keep_checkpoints_without_metrics=False))])
            best = dict(best_fn=metric, best_mode="max")  # saves and reloads the metrics
        if read_only:
            logging.getLogger("absl").addFilter(_READ_ONLY_FILTER)  # idempotent
            # (the options orbax would otherwise override with a logged warning)
            options = ocp.CheckpointManagerOptions(read_only=True, create=False,
                                                   save_interval_steps=0,
                                                   enable_async_checkpointing=False, **best)
        else:
            self.directory.mkdir(parents=True, exist_ok=True)
            options = ocp.CheckpointManagerOptions(
                preservation_policy=policy, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True, create=True, **best)
        self._report_partial()
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def _report_partial(self) -> None:
        if jax.process_index() != 0:
            return
        for p in sorted(self.directory.glob(f"*{TMP_MARKER}*")):
            why = ("a run stopped while saving it, or is saving it now" if self.read_only else
                   "the run stopped while saving it")
            self.skipped.append(f"{p.name} (incomplete: {why})")
            self.log(f"checkpoint: ignoring incomplete checkpoint {p.name} ({why})"
                     + ("." if self.read_only else "; removing it."))

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def state_metadata(self, step: int) -> Any:
        """Orbax's metadata tree of the train state saved at ``step`` (its structure, with
        shapes and dtypes for leaves), read without restoring any array.

        Raises:
          Exception: whatever orbax raises for a missing or unreadable checkpoint.
        """
        return ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False,
             metrics: Optional[dict] = None) -> bool:
        """Starts saving ``state`` at ``step`` (returns at once when async); ``metrics``
        (with ``best_metric``) rank it for ``best_step``."""
        meta = {"step": int(step), "digest": state_digest(state), "time": time.time()}
        kw = {"metrics": metrics} if self.best_metric is not None and metrics else {}
        return self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=force, **kw)

    def best_step(self) -> Optional[int]:
        """The step whose saved ``best_metric`` is highest (None: no ranked checkpoint)."""
        if self.best_metric is None:
            return None
        self.manager.wait_until_finished()
        return self.manager.best_step()

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        """``(state, data_state)`` of checkpoint ``step``, restored into ``abstract_state``'s
        shapes and shardings and verified (step, digest, data state present).

        Raises:
          Exception: whatever orbax raises for a missing or unreadable checkpoint, or
            ``ValueError`` for one that does not verify.
        """
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        state, meta = out["state"], out["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise ValueError(f"metadata is missing or names another step ({meta!r})")
        if int(jax.device_get(state["step"])) != step:
            raise ValueError(f"state holds step {int(jax.device_get(state['step']))}")
        digest = meta.get("digest")
        if digest is not None:
            got = state_digest(state)
            if got is not None and got != digest:
                raise ValueError("array contents do not match the digest written at save time")
        if out["data"] is None:
            raise ValueError("the data-pipeline state is missing")
        return state, out["data"]

    def restore_latest(self, abstract_state: Any) -> Optional[tuple[int, Any, dict]]:
        """The newest checkpoint that restores and verifies, as ``(step, state, data_state)``.

        Checkpoints that fail are reported, moved to ``../corrupt_checkpoints`` (unless
        ``read_only``) and skipped. Returns None when there is none.
        """
        bad = []
        result = None
        for step in reversed(self.steps()):
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # any failure means: do not use this checkpoint
                self.skipped.append(f"step {step} (corrupt or incomplete: {failure(e)})")
                self.log(f"checkpoint: step {step} in {self.directory} is corrupt or "
                         f"incomplete ({failure(e)}); skipping it.")
                bad.append(step)
                continue
            result = (step, state, data)
            break
        if bad and not self.read_only:
            self._quarantine(bad)
        return result

    def _quarantine(self, steps: list[int]) -> None:
        if jax.process_index() == 0:
            dest = self.directory.parent / "corrupt_checkpoints"
            dest.mkdir(exist_ok=True)
            for step in steps:
                src = self.directory / str(step)
                target = dest / f"{step}-{int(time.time())}"
                if src.exists():
                    shutil.move(str(src), str(target))
                    self.log(f"checkpoint: moved step {step} to {target}.")
        self.manager.reload()

    def wait(self) -> None:
        """Blocks until a background save has finished."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
