"""The ``unitscale-jax`` command: ``train`` (default), ``sample`` and ``analyse``.

``unitscale-jax train --preset tiny`` trains on the built-in corpus; rerunning the same command
resumes from its last checkpoint. ``unitscale-jax sample --run-dir runs/tiny-decoder-umup
--prompt "The "`` continues a prompt; for an encoder run (``--model encoder``) ``--prompt "The
<mask> of"`` lists the likeliest tokens at each ``<mask>``, and for an encdec run it generates
the text of each ``<mask>`` span. Mistakes in the input (options, data, config) print one
line on stderr and exit with status 2; a run stopped by a non-finite loss or an interrupt
exits with status 1 (its last good checkpoint stays).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

USAGE = """usage: unitscale-jax {train,sample,analyse} [options]

  train    train a model (default when the first argument is an option); --help for options
  sample   what a trained run predicts: --run-dir DIR --prompt TEXT; a decoder continues
           TEXT, an encoder fills each <mask> in it (top-k tokens with probabilities), an
           encdec generates each <mask> span of it; --help for options
  analyse  scale table and plot of every op, weight and gradient at init, and the
           coordinate check: --parametrization umup|sp [--coord-check] [--out DIR]
"""


def _quiet_logs() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import logging as absl_logging  # an orbax dependency
    absl_logging.set_verbosity(absl_logging.WARNING)
    import logging
    for name in ("absl", "orbax", "jax._src.distributed", "grain"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _train(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.flags import parse_train_args
    from unitscale_jax.train.loop import format_summary, run
    cfg = parse_train_args(argv, prog)
    summary = run(cfg)
    print(format_summary(summary), flush=True)
    if summary["checkpoint"]:
        prompt = "'The '" if cfg.model.kind == "decoder" else "'The <mask> of the'"
        print(f"  sample:      unitscale-jax sample --run-dir {summary['run_dir']} "
              f"--prompt {prompt}", flush=True)
    return 0


def _sample(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.flags import sample_options, sample_parser
    from unitscale_jax.train.sample import sample
    ns = sample_parser(prog).parse_all(argv)
    report = sample(ns.run_dir, ns.prompt, step=ns.step, log=lambda m: print(m, file=sys.stderr),
                    **sample_options(ns))
    print(report, flush=True)
    return 0


def _analyse(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.analysis.cli import analyse_main
    return analyse_main(list(argv), prog)


def main(argv: Optional[Sequence[str]] = None, prog: str = "unitscale-jax") -> int:
    """Entry point; returns the exit status (``SystemExit`` from ``--help`` passes through)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _quiet_logs()
    from unitscale_jax.train.errors import TrainingStopped, UsageError
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    command, rest = (argv[0], argv[1:]) if not argv[0].startswith("-") else ("train", argv)
    commands = {"train": _train, "sample": _sample, "analyse": _analyse}
    if command not in commands:
        print(f"{prog}: error: unknown command {command!r}; use train, sample or analyse.",
              file=sys.stderr)
        return 2
    sub_prog = prog if prog != "unitscale-jax" else f"{prog} {command}"
    try:
        return commands[command](rest, sub_prog)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
