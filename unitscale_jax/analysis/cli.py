"""``unitscale-jax analyse``: the scale-tracking figure and table, and the coordinate check.

::

    unitscale-jax analyse --model decoder --parametrization umup --out analysis/
    unitscale-jax analyse --parametrization sp --d-model 256 --n-layers 4
    unitscale-jax analyse --coord-check            # quick: widths 64..512, 5 steps
    unitscale-jax analyse --coord-check --full     # widths 64..2048, 5 steps
    unitscale-jax analyse --coord-check --no-scales --coord-parametrizations umup mup

writes ``scales_<model>_<parametrization>.csv`` / ``.png`` (one forward and backward pass of
a freshly initialised model, ``track_scales`` + ``plot_scales``) and, with ``--coord-check``,
``coord_check.csv`` / ``.png`` (u-muP, muP and SP; ``coord.coord_check``) and prints the
table of ``coord.width_ratios`` at the last step: per module, the max / min of its mean |x|
(``--coord-stat``) across the widths, and the slope against width. The batch of the scale
pass is byte-level text (vocabulary 256): the built-in corpus (Python's ``pydoc_data``
topics, offline), a text file (``--data FILE``), or uniformly random ids (``--data random``);
the coordinate check's is random ids.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

from unitscale_jax.paths import PathError, existing_file, output_dir
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.flags import Parser

MODELS = ("decoder",)
PARAMETRIZATIONS = ("umup", "sp", "mup")


def parser(prog: str = "unitscale-jax analyse") -> argparse.ArgumentParser:
    """The flags of ``unitscale-jax analyse`` (a parse error is a one-line ``UsageError``)."""
    p = Parser(prog=prog, description=__doc__.split("\n\n")[0],
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="decoder", help="model kind")
    p.add_argument("--parametrization", choices=PARAMETRIZATIONS, default="umup")
    p.add_argument("--d-model", type=int, default=128, help="width")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--data", default="builtin", help="'builtin', 'random' or a UTF-8 text file")
    p.add_argument("--metric", choices=("rms", "std", "mean_abs", "max_abs"), default="rms",
                   help="x axis of the figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="analysis", help="output folder")
    p.add_argument("--coord-check", action="store_true", help="also run the coordinate check")
    p.add_argument("--full", action="store_true",
                   help="coordinate check at widths 64..2048 (default: quick, 64..512)")
    p.add_argument("--widths", type=int, nargs="+", help="coordinate-check widths")
    p.add_argument("--steps", type=int, help="coordinate-check steps (default 5)")
    p.add_argument("--coord-parametrizations", nargs="+", choices=PARAMETRIZATIONS,
                   default=list(PARAMETRIZATIONS), help="coordinate-check parametrizations")
    p.add_argument("--coord-stat", choices=("mean_abs", "rms"), default="mean_abs",
                   help="coordinate-check statistic of the figure and the ratio table")
    # the coordinate check uses --n-layers, --vocab-size, --batch-size, --seq-len (<= 64),
    # --seed; its heads are width / 16 and its learning rates coord_check.LEARNING_RATES
    p.add_argument("--no-scales", action="store_true", help="skip the scale-tracking pass")
    return p


def text_batch(source: str, batch_size: int, seq_len: int, vocab_size: int,
               seed: int = 0) -> np.ndarray:
    """``[batch_size, seq_len]`` int32 ids: random windows of byte-level text, or random ids.

    Args:
      source: ``"builtin"`` (``unitscale_jax.data.corpus.builtin_documents``), ``"random"``
        (uniform ids in ``[0, vocab_size)``) or a path to a UTF-8 text file.
    """
    rng = np.random.default_rng(seed)
    if source == "random":
        return rng.integers(0, vocab_size, (batch_size, seq_len), dtype=np.int32)
    if vocab_size < 256:
        raise ValueError(f"byte-level text needs --vocab-size >= 256, got {vocab_size}; "
                         f"use --data random for a smaller vocabulary.")
    if source == "builtin":
        from unitscale_jax.data.corpus import builtin_documents
        text = "\n".join(t for _, t in builtin_documents())
    else:
        existing_file(source, "--data", "'builtin', 'random' or a UTF-8 text file")
        with open(source, encoding="utf-8", errors="replace") as f:
            text = f.read()
    data = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    if data.size < seq_len + 1:
        raise ValueError(f"--data {source!r} has {data.size} bytes; "
                         f"need more than --seq-len {seq_len}.")
    starts = rng.integers(0, data.size - seq_len + 1, batch_size)
    return np.stack([data[s:s + seq_len] for s in starts])


def _scales(ns, log) -> None:
    from flax import nnx

    from unitscale_jax.analysis.plot import plot_scales
    from unitscale_jax.analysis.records import write_csv
    from unitscale_jax.analysis.tracking import track_scales
    from unitscale_jax.nn import TransformerConfig, TransformerDecoder

    ids = text_batch(ns.data, ns.batch_size, ns.seq_len, ns.vocab_size, ns.seed)
    config = TransformerConfig(vocab_size=ns.vocab_size, d_model=ns.d_model, n_layers=ns.n_layers,
                               n_heads=ns.n_heads, max_seq_len=max(ns.seq_len, 2),
                               parametrization=ns.parametrization, scan_layers=False)
    model = TransformerDecoder(config, rngs=nnx.Rngs(ns.seed))
    records = track_scales(model, ids)
    stem = os.path.join(ns.out, f"scales_{ns.model}_{ns.parametrization}")
    write_csv(records, stem + ".csv")
    title = (f"{ns.model}, {ns.parametrization}: d_model {ns.d_model}, {ns.n_layers} layers, "
             f"batch {ns.batch_size}x{ns.seq_len}, loss {records[0]['loss']:.3f}")
    plot_scales(records, stem + ".png", metric=ns.metric, title=title)
    log(f"wrote {stem}.csv and {stem}.png ({len(records)} records)")


def _coord_check(ns, log) -> None:
    from unitscale_jax.analysis import coord as cc
    from unitscale_jax.analysis.records import write_csv
    from unitscale_jax.nn import TransformerConfig

    widths = ns.widths or (cc.WIDTHS if ns.full else cc.QUICK_WIDTHS)
    steps = ns.steps if ns.steps is not None else cc.STEPS
    seq_len = min(ns.seq_len, 64)
    config = TransformerConfig(vocab_size=ns.vocab_size, d_model=min(widths), n_layers=ns.n_layers,
                               n_heads=1, max_seq_len=seq_len, sp_init_std=None)
    pars = tuple(dict.fromkeys(ns.coord_parametrizations))
    records = cc.coord_check(pars, widths, steps, batch_size=ns.batch_size,
                             seq_len=seq_len, config=config, seed=ns.seed, progress=log)
    stem = os.path.join(ns.out, "coord_check")
    write_csv(records, stem + ".csv")
    cc.plot_coord_check(records, stem + ".png", stat=ns.coord_stat, lines="step")
    log(cc.ratio_table(cc.width_ratios(records, stat=ns.coord_stat), ns.coord_stat))
    log(f"wrote {stem}.csv and {stem}.png ({len(records)} records)")



def analyse_main(argv: Optional[Sequence[str]] = None, prog: str = "unitscale-jax analyse") -> int:
    """Runs ``unitscale-jax analyse``; returns the exit status (0).

    Raises:
      UsageError: a bad option or value (``unitscale_jax.cli.main`` prints it as one line).
      PathError: ``--out`` or ``--data`` of the wrong kind, or ``--out`` not writable.
    """
    ns = parser(prog).parse_all(list(sys.argv[1:] if argv is None else argv))
    for name in ("d_model", "n_layers", "n_heads", "vocab_size", "seq_len", "batch_size"):
        if getattr(ns, name) < 1 or (name == "seq_len" and ns.seq_len < 2):
            raise UsageError(f"--{name.replace('_', '-')} must be >= "
                             f"{2 if name == 'seq_len' else 1}.")
    if ns.no_scales and not ns.coord_check:
        raise UsageError("--no-scales without --coord-check leaves nothing to do.")
    output_dir(ns.out, "--out")

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        if not ns.no_scales:
            _scales(ns, log)
        if ns.coord_check:
            _coord_check(ns, log)
    except PathError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0
