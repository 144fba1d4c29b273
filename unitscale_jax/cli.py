"""The ``unitscale-jax`` command: ``train`` (default), ``sample``, ``analyse``, ``tokenizer``,
``prepare`` (a corpus tokenized once into shards, for ``train --data prepared:DIR``),
``convert``, ``export``, ``merge`` (a LoRA run's adapters folded into its kernels), ``grow``
(a finished run's model grown deeper, as a new run), ``plan`` (a run's per-device memory,
FLOPs, collectives and predicted step time on a device mesh, compiled for fake devices), and
``finetune`` / ``evaluate`` / ``predict`` (an encoder on labelled data).

``unitscale-jax train --preset tiny`` trains on the built-in corpus; rerunning the same command
resumes from its last checkpoint. ``unitscale-jax sample --run-dir runs/tiny-decoder-umup
--prompt "The "`` continues a prompt; for an encoder run (``--model encoder``) ``--prompt "The
<mask> of"`` lists the likeliest tokens at each ``<mask>``, and for an encdec run it generates
the text of each ``<mask>`` span. Mistakes in the input (options, data, config, a path of the
wrong kind or where nothing can be written: ``unitscale_jax.paths``) print one line on stderr
and exit with status 2; a run stopped by a non-finite loss or an interrupt
exits with status 1 (its last good checkpoint stays).
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

USAGE = """usage: unitscale-jax {train,sample,analyse,tokenizer,prepare,convert,export,merge,
                      grow,plan,finetune,evaluate,predict} [options]

  train    train a model (default when the first argument is an option); --help for options
  sample   what a trained run predicts: --run-dir DIR --prompt TEXT; a decoder continues
           TEXT, an encoder fills each <mask> in it (top-k tokens with probabilities), an
           encdec generates each <mask> span of it; --help for options
  analyse  scale table and plot of every op, weight and gradient at init, and the
           coordinate check: --parametrization umup|sp|mup [--coord-check] [--out DIR]
  tokenizer train a subword tokenizer on local text: tokenizer train --data FILES
           --kind wordpiece|bpe|unigram --vocab-size N --out tok.json
  prepare  tokenize a corpus once into sharded ArrayRecord files (parallel, resumable), for
           train --data prepared:DIR: --data GLOB --tokenizer T --out DIR [--workers N]
  convert  a unit_scaling (PyTorch) TransformerDecoder state dict as a run directory:
           --from-torch CKPT --config CONFIG.json --run-dir DIR
  export   a run's parameters and u-muP metadata as one file (train --init-from FILE
           starts a new run from it): --run-dir DIR [--format safetensors] [--out FILE]
  merge    a LoRA run's adapters folded into the base kernels, as one file of the base
           model: --run-dir DIR [--out FILE] [--step N]
  grow     a finished run's model grown deeper, as a new run that train continues with the
           same learning rate: --from RUN --depth 2x --run-dir NEW [--mode duplicate|interleave]
  plan     a run's per-device memory, FLOPs, collectives and predicted step time on a mesh,
           compiled for fake CPU devices: --preset 7b --mesh fsdp=64,tensor=4
           [--accelerator tpu-v5p] [--json FILE]
  finetune fine-tune an encoder: --task classify|tag --data DIR (or --train F --dev F)
           [--init-from RUN_DIR] [--freeze-trunk]; --help for options
  evaluate score a fine-tuned run: --run-dir DIR --data FILE (writes report.json)
           [--task NAME: a multi-task run's task]
  predict  predictions of a fine-tuned run: --run-dir DIR --data FILE --out FILE
           [--task NAME]
"""


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def _keep_freed_memory() -> None:
    """Lets glibc's malloc keep the memory XLA frees, instead of returning it to the system.

    XLA on the CPU allocates each step's temporary buffer afresh (about 160 MB for a d_model 128,
    3-layer, 128-token model at batch 16). glibc serves any block over 32 MB with its own
    ``mmap`` and unmaps it on ``free``, so every step faulted in some 40,000 fresh zeroed pages:
    2.5 million page faults and a sixth of the CPU time in the kernel over 60 steps. With one
    arena, no ``mmap`` blocks and no trimming, freed blocks are reused: a tenth of the faults
    and of the system time (measured with ``/usr/bin/time -v``). Skipped when the user set any
    ``MALLOC_*`` variable, and off glibc.
    """
    if sys.platform != "linux" or any(k.startswith("MALLOC_") for k in os.environ):
        return
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1 << 30)):
        mallopt(param, value)


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
    import jax
    if jax.process_index() != 0:  # a multi-process run: process 0 reports
        return 0
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


def _merge(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.flags import merge_parser
    from unitscale_jax.train.interop import merge_run
    ns = merge_parser(prog).parse_all(argv)
    merge_run(ns.run_dir, ns.out, step=ns.step, log=lambda m: print(m, flush=True))
    return 0


def _grow(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.flags import grow_parser
    from unitscale_jax.train.grow import grow_run, parse_factor
    ns = grow_parser(prog).parse_all(argv)
    width = None if ns.width is None else parse_factor(ns.width, "--width")
    grow_run(ns.source, ns.run_dir, parse_factor(ns.depth, "--depth"), mode=ns.mode,
             steps=ns.steps, width_factor=width, log=lambda m: print(m, flush=True))
    return 0


def _plan(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax import paths
    from unitscale_jax.train import plan as planner
    from unitscale_jax.train.flags import parse_plan_args
    cfg, ns = parse_plan_args(argv, prog)
    sizes = planner.parse_mesh(ns.mesh)
    out = None if ns.json is None else paths.output_file(ns.json, "--json", "plan.json")
    vocab = ns.vocab_size if ns.vocab_size is not None else planner.default_vocab_size(cfg)
    result = planner.plan(cfg, sizes, vocab_size=vocab, accelerator=ns.accelerator,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    print(planner.format_plan(result), flush=True)
    if out is not None:
        planner.write_plan(result, out)
        print(f"  plan: {out}", flush=True)
    return 0


def _analyse(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.analysis.cli import analyse_main
    return analyse_main(list(argv), prog)


def _tokenizer(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.errors import UsageError
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {prog} train --data FILES --kind wordpiece|bpe|unigram --vocab-size N "
              f"--out tok.json\n  (see {prog} train --help)")
        return 0
    if argv[0] != "train":
        raise UsageError(f"unknown {prog} command {argv[0]!r}; use '{prog} train --data FILES "
                         "--out tok.json'.")
    from unitscale_jax.data.tokenizers import train_tokenizer
    from unitscale_jax.train.flags import tokenizer_train_parser
    ns = tokenizer_train_parser(f"{prog} train").parse_all(argv[1:])
    files = [f.strip() for value in ns.data for f in value.split(",") if f.strip()]
    if not files:
        raise UsageError("--data is empty; pass text files or globs.")
    try:
        tok = train_tokenizer(files, kind=ns.kind, vocab_size=ns.vocab_size, out_path=ns.out,
                              lowercase=ns.lowercase, min_frequency=ns.min_frequency)
    except (ValueError, OSError) as e:
        raise UsageError(str(e)) from None
    print(f"tokenizer: {ns.kind}, vocabulary {tok.vocab_size} (pad {tok.pad_id}, bos "
          f"{tok.bos_id}, eos {tok.eos_id}, mask {tok.mask_id}) -> {ns.out}; use it with "
          f"--tokenizer hf:{ns.out}", flush=True)
    return 0


def _prepare(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.data.prepared import prepare_corpus
    from unitscale_jax.paths import PathError
    from unitscale_jax.train.errors import UsageError
    from unitscale_jax.train.flags import prepare_parser
    ns = prepare_parser(prog).parse_all(argv)
    files = [f.strip() for value in ns.data for f in value.split(",") if f.strip()]
    if not files:
        raise UsageError("--data is empty; pass text files or globs.")
    try:
        prepare_corpus(files, ns.out, tokenizer=ns.tokenizer, workers=ns.workers,
                       validation_fraction=ns.validation_fraction, chunk_chars=ns.chunk_chars,
                       piece_bytes=max(1, round(ns.piece_mb * 2**20)),
                       log=lambda m: print(m, flush=True))
    except PathError:
        raise
    except (ValueError, OSError, RuntimeError, ImportError) as e:
        raise UsageError(str(e)) from None
    print(f"  train:       unitscale-jax train --data prepared:{ns.out} --tokenizer "
          f"{ns.tokenizer}", flush=True)
    return 0


def _finetune(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.finetune import finetune, format_finetune_summary
    from unitscale_jax.train.flags import parse_finetune_args
    summary = finetune(parse_finetune_args(argv, prog))
    print(format_finetune_summary(summary), flush=True)
    return 0


def _evaluate(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.finetune import evaluate_run
    from unitscale_jax.train.flags import evaluate_parser
    ns = evaluate_parser(prog).parse_all(argv)
    report, table = evaluate_run(ns.run_dir, ns.data, out=ns.out, step=ns.step,
                                 log=lambda m: print(m, file=sys.stderr), task_name=ns.task_name)
    head = f" (task {ns.task_name})" if ns.task_name else ""
    print(f"{ns.data}: {report['n_examples']} examples, step {report['step']} of "
          f"{ns.run_dir}{head}\n{table}\n  report: {report['report']}", flush=True)
    return 0


def _predict(argv: Sequence[str], prog: str) -> int:
    from unitscale_jax.train.finetune import predict_run
    from unitscale_jax.train.flags import predict_parser
    ns = predict_parser(prog).parse_all(argv)
    n = predict_run(ns.run_dir, ns.data, ns.out, step=ns.step,
                    log=lambda m: print(m, file=sys.stderr), task_name=ns.task_name)
    print(f"predictions for {n} examples -> {ns.out}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None, prog: str = "unitscale-jax") -> int:
    """Entry point; returns the exit status (``SystemExit`` from ``--help`` passes through)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _keep_freed_memory()
    _quiet_logs()
    from unitscale_jax.paths import PathError
    from unitscale_jax.train.errors import PeerLost, TrainingStopped, UsageError
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    command, rest = (argv[0], argv[1:]) if not argv[0].startswith("-") else ("train", argv)
    commands = {"train": _train, "sample": _sample, "analyse": _analyse,
                "tokenizer": _tokenizer, "prepare": _prepare, "convert": _convert,
                "export": _export, "merge": _merge, "grow": _grow, "plan": _plan,
                "finetune": _finetune, "evaluate": _evaluate, "predict": _predict}
    if command not in commands:
        print(f"{prog}: error: unknown command {command!r}; use {', '.join(commands)}.",
              file=sys.stderr)
        return 2
    sub_prog = prog if prog != "unitscale-jax" else f"{prog} {command}"
    try:
        return commands[command](rest, sub_prog)
    except (UsageError, PathError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        if isinstance(e, PeerLost):  # not JAX's exit barrier, which waits for the dead peer
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
