"""The ``unitscale-jax`` command: ``train`` (default), ``sample``, ``analyse``, ``convert``
and ``export``.

``unitscale-jax train --preset tiny`` trains on the built-in corpus; rerunning the same command
resumes from its last checkpoint. ``unitscale-jax sample --run-dir runs/tiny-decoder-umup
--prompt "The "`` continues a prompt. Mistakes in the input (options, data, config) print one
line on stderr and exit with status 2; a run stopped by a non-finite loss or an interrupt
exits with status 1 (its last good checkpoint stays).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

USAGE = """usage: unitscale-jax {train,sample,analyse,convert,export} [options]

  train    train a model (default when the first argument is an option); --help for options
  sample   generate text from a trained decoder run: --run-dir DIR --prompt TEXT
  analyse  scale table and plot of every op, weight and gradient at init, and the
           coordinate check: --parametrization umup|sp [--coord-check] [--out DIR]
  convert  a unit_scaling (PyTorch) TransformerDecoder state dict as a run directory:
           --from-torch CKPT --config CONFIG.json --run-dir DIR
  export   a run's parameters and u-muP metadata as one file (train --init-from FILE
           starts a new run from it): --run-dir DIR [--format safetensors] [--out FILE]
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
    if cfg.model.kind == "decoder" and summary["checkpoint"]:
        print(f"  sample:      unitscale-jax sample --run-dir {summary['run_dir']} "
              "--prompt 'The '", flush=True)
    return 0


def _sample(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.flags import sample_parser
    from unitscale_jax.train.sample import sample
    ns = sample_parser(prog).parse_all(argv)
    texts = sample(ns.run_dir, ns.prompt, max_new_tokens=ns.max_new_tokens,
                   temperature=ns.temperature, top_k=ns.top_k, seed=ns.seed,
                   num_samples=ns.num_samples, step=ns.step,
                   log=lambda m: print(m, file=sys.stderr))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1}")
        print(ns.prompt + text, flush=True)
    return 0


def _convert(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.flags import convert_parser
    from unitscale_jax.train.from_torch import convert
    ns = convert_parser(prog).parse_all(argv)
    out = convert(ns.from_torch, ns.config, ns.run_dir)
    print(f"  sample:      unitscale-jax sample --run-dir {out['run_dir']} --prompt 'The '\n"
          f"  train:       unitscale-jax train --config {out['config']} --steps N\n"
          f"  export:      unitscale-jax export --run-dir {out['run_dir']}", flush=True)
    return 0


def _export(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.flags import export_parser
    from unitscale_jax.train.interop import export_run
    ns = export_parser(prog).parse_all(argv)
    export_run(ns.run_dir, ns.out, fmt=ns.format, step=ns.step,
               log=lambda m: print(m, flush=True))
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
    commands = {"train": _train, "sample": _sample, "analyse": _analyse, "convert": _convert,
                "export": _export}
    if command not in commands:
        print(f"{prog}: error: unknown command {command!r}; use "
              f"{', '.join(list(commands)[:-1])} or {list(commands)[-1]}.", file=sys.stderr)
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
