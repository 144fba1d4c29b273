"""``run(config) -> summary``: one training run, start to finish (or resumption to finish);
a thin wrapper over ``unitscale_jax.train.trainer.Trainer``."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from unitscale_jax.train.config import Config
from unitscale_jax.train.trainer import Trainer


def run(config: Config | dict, *, quiet: bool = False,
        devices: Optional[Sequence[Any]] = None) -> dict[str, Any]:
    """Trains (or resumes) the run described by ``config``.

    Args:
      config: a ``Config`` (or its ``to_dict()``); ``None`` fields take their defaults.
      quiet: no progress bar or reports (the metrics files are still written).
      devices: the devices of the mesh (default every device of every process).

    Returns:
      A summary dict: ``run_dir``, ``steps``, ``start_step`` (> 0 when resumed),
      ``final_train_loss``, ``final_val_loss``, ``final_bits_per_byte``, ``tokens_per_s``,
      ``time_to_first_step_s`` (includes compilation), ``startup_s``, ``train_s``,
      ``n_params``, ``devices``, ``sharded_params`` (parameter arrays split over devices),
      the output paths (``metrics``, ``tensorboard``, ``plot``,
      ``checkpoint``, ``config``), ``skipped_steps`` and ``history`` (this call's metric
      rows).

    Raises:
      UsageError: bad options or data (one-line message).
      TrainingStopped: a non-finite loss or an interrupt (the last good checkpoint stays).
    """
    return Trainer(config, quiet=quiet, devices=devices).run()


def format_summary(s: dict) -> str:
    """The short report printed at the end of ``unitscale-jax train``."""
    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    lines = [
        f"done: {s['steps']} steps ({s['steps'] - s['start_step']} this run"
        + (f", resumed at step {s['start_step']}" if s["start_step"] else "") + "), "
        f"{f(s['tokens_per_s'], ',.0f')} tokens/s, first step (with compilation) "
        f"{f(s['time_to_first_step_s'], '.1f')} s",
        f"final train loss {f(s['final_train_loss'], '.4f')}, validation loss "
        f"{f(s['final_val_loss'], '.4f')} ({f(s['final_bits_per_byte'], '.4f')} bits/byte)",
        f"  metrics:     {s['metrics']}",
    ]
    if s["tensorboard"]:
        lines.append(f"  tensorboard: {s['tensorboard']}  "
                     f"(tensorboard --logdir {s['tensorboard']})")
    if s["plot"]:
        lines.append(f"  plot:        {s['plot']}")
    if s["checkpoint"]:
        lines.append(f"  checkpoint:  {s['checkpoint']}")
    lines.append(f"  config:      {s['config']}")
    return "\n".join(lines)
