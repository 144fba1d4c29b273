"""Named starting configurations: ``demo``, ``tiny``, ``small``, ``base``, ``1b``, ``3b``, ``7b``.

``demo`` (what ``make demo`` trains) reaches a validation loss under 2 nats per byte on the
built-in corpus in about five minutes on two CPU cores; ``tiny`` trains in about a minute
(the tests' starting point), ``small`` in a few minutes, ``base`` is sized for one
accelerator. ``1b``, ``3b`` and ``7b`` are pod-sized decoders with Llama-like shapes (RoPE,
SwiGLU, RMS norm; the widths, depths, heads and MLP sizes of TinyLlama-1.1B, OpenLLaMA-3B and
Llama-2-7B), 2048-token sequences, bfloat16 compute, FSDP, scanned and rematerialised layers;
their parameter counts (``PARAMETERS``) assume the 32000-entry vocabulary of
``VOCAB_SIZES``: train them with a tokenizer of that size (``--tokenizer hf:tok.json``, e.g.
from ``unitscale-jax tokenizer train --vocab-size 32000``); ``unitscale-jax plan`` sizes
them for a device mesh (``unitscale_jax.train.plan``). Command-line flags override any field
of a preset.
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


def _llama(d_model: int, n_layers: int, n_heads: int, d_ff: int, n_kv_heads=None, *,
           batch_size: int, name: str) -> Config:
    return Config(ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                              n_kv_heads=n_kv_heads, d_ff=d_ff, rope=True, scan_layers=True,
                              remat=True),
                  DataConfig(seq_len=2048),
                  OptimizerConfig(),
                  TrainingConfig(steps=20000, batch_size=batch_size, eval_every=1000,
                                 eval_batches=16, log_every=10, precision="bf16",
                                 sharding="fsdp"),
                  preset=name)


def _1b() -> Config:  # TinyLlama-1.1B's shapes (grouped-query attention, 4 kv heads)
    return _llama(2048, 22, 32, 5632, n_kv_heads=4, batch_size=256, name="1b")


def _3b() -> Config:  # OpenLLaMA-3B's shapes
    return _llama(3200, 26, 32, 8640, batch_size=512, name="3b")


def _7b() -> Config:  # Llama-2-7B's shapes
    return _llama(4096, 32, 32, 11008, batch_size=1024, name="7b")


PRESETS = {"demo": _demo, "tiny": _tiny, "small": _small, "base": _base, "1b": _1b, "3b": _3b,
           "7b": _7b}

VOCAB_SIZES = {"1b": 32000, "3b": 32000, "7b": 32000}
"""The vocabulary each pod-sized preset is meant for (its ``PARAMETERS`` count and what
``unitscale-jax plan`` assumes unless given ``--vocab-size``); the other presets use their
tokenizer's (``bytes``: 260)."""

PARAMETERS = {"1b": 1_099_956_224, "3b": 3_426_304_000, "7b": 6_738_149_376}
"""Parameters of the pod-sized presets' decoders at ``VOCAB_SIZES`` (untied embedding and
readout; u-muP's norms have no gains, so Llama-2-7B's 6,738,415,616 is 65 x 4096 more)."""


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
