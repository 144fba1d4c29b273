"""Run metrics: ``metrics.jsonl`` (one JSON object per line) and TensorBoard event files.

Each line is ``{"step": s, "split": "train" | "validation", ...}``: training lines carry
``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``elapsed_s``; validation lines carry
``loss`` (nats per scored token) and ``bits_per_byte``. A resumed run first drops the lines of
steps after its checkpoint (``truncate``) so the file reads as one uninterrupted run; its
TensorBoard writer purges those steps too (``purge_step``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from unitscale_jax.paths import write_text_atomic

TIMING_KEYS = ("tokens_per_s", "elapsed_s", "step_time_s")


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Every complete, parsable line of a ``metrics.jsonl`` (a torn last line is skipped)."""
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "step" in row:
            out.append(row)
    return out


def truncate(path: str | os.PathLike, last_step: int) -> int:
    """Keeps only lines with ``step <= last_step`` (the file is replaced atomically, so a kill
    here loses nothing); returns how many were dropped."""
    rows = read_metrics(path)
    keep = [r for r in rows if r["step"] <= last_step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    return len(rows) - len(keep)


class MetricsWriter:
    """Appends metric rows to ``metrics.jsonl`` and, optionally, TensorBoard.

    Args:
      run_dir: the run directory.
      tensorboard: also write ``<run_dir>/tensorboard`` event files (tensorboardX).
      purge_step: TensorBoard hides earlier-written events at steps >= this (resumption).
      enabled: False on non-primary processes (nothing is written).
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True,
                 purge_step: Optional[int] = None, enabled: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb_dir = Path(run_dir) / "tensorboard" if tensorboard else None
        self.enabled = enabled
        self._file = open(self.path, "a", buffering=1) if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from tensorboardX import SummaryWriter
            self._tb = SummaryWriter(str(self.tb_dir), purge_step=purge_step, flush_secs=10)

    def write(self, step: int, split: str, values: dict[str, Any]) -> dict:
        row = {"step": int(step), "split": split,
               **{k: (float(v) if not isinstance(v, (int, str)) else v)
                  for k, v in values.items()}}
        if not self.enabled:
            return row
        self._file.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) or hasattr(v, "__float__"):
                    self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
        return row

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def loss_curve(rows: Iterable[dict], split: str = "train",
               key: str = "loss") -> list[tuple[int, float]]:
    """``(step, value)`` pairs of one split (what the resume tests compare)."""
    return [(r["step"], r[key]) for r in rows if r.get("split") == split and key in r]
