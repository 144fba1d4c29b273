"""Named starting configurations: ``demo``, ``tiny``, ``small``, ``base``.

``demo`` (what ``make demo`` trains) reaches a validation loss under 2 nats per byte on the
built-in corpus in about five minutes on two CPU cores; ``tiny`` trains in about a minute
(the tests' starting point), ``small`` in a few minutes, ``base`` is sized for one
accelerator. Command-line flags override any field of a preset.
"""

from __future__ import annotations

import difflib

from unitscale_jax.train.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    TrainingConfig,
)
from unitscale_jax.train.errors import UsageError


def _demo() -> Config:
    # Chosen by 600- and 2000-step runs on the built-in corpus (2 CPU cores): u-muP's Adam at
    # lr 0.5 beat 0.25, 1 and 2 (validation loss 2.47 / 2.55 / 2.61 at 600 steps for 0.5 / 1 /
    # 2), and the multipliers the width-32 sweep preferred (attn 4, residual 0.25, ratio 0.25,
    # loss 4) helped at 600 steps but lost by 0.17 nats at 1250. Unscanned layers: on the CPU
    # a scanned stack compiles 2.5x slower and steps about 25% slower (its loop copies).
    return Config(ModelConfig(d_model=128, n_layers=3, n_heads=4, scan_layers=False),
                  DataConfig(seq_len=128),
                  OptimizerConfig(lr=0.5),
                  TrainingConfig(steps=1800, batch_size=16, eval_every=300, eval_batches=8,
                                 log_every=10),
                  preset="demo")


def _tiny() -> Config:
    return Config(ModelConfig(d_model=64, n_layers=2, n_heads=4),
                  DataConfig(seq_len=64),
                  OptimizerConfig(),
                  TrainingConfig(steps=300, batch_size=16, eval_every=100, eval_batches=4),
                  preset="tiny")


def _small() -> Config:
    return Config(ModelConfig(d_model=128, n_layers=4, n_heads=4),
                  DataConfig(seq_len=128),
                  OptimizerConfig(),
                  TrainingConfig(steps=400, batch_size=16, eval_every=100, eval_batches=8,
                                 log_every=5),
                  preset="small")


def _base() -> Config:
    return Config(ModelConfig(d_model=512, n_layers=8, n_heads=8),
                  DataConfig(seq_len=256),
                  OptimizerConfig(),
                  TrainingConfig(steps=5000, batch_size=64, eval_every=500, eval_batches=16,
                                 log_every=10, checkpoint_every=1000),
                  preset="base")


PRESETS = {"demo": _demo, "tiny": _tiny, "small": _small, "base": _base}


def get_preset(name: str) -> Config:
    """A fresh copy of preset ``name``.

    Raises:
      UsageError: unknown name (with the closest known one).
    """
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"unknown preset {name!r}{hint}; choose one of {', '.join(PRESETS)}.")
    return PRESETS[name]()
