"""Command-line flags generated from the config dataclasses.

Every field of ``ModelConfig``, ``DataConfig``, ``OptimizerConfig`` and ``TrainingConfig``
becomes ``--field-name`` (or the ``flag`` in its metadata), with the preset's value as its
default: booleans get ``--x`` / ``--no-x``; optional fields accept ``none``; floats also accept
powers of two such as ``2^-3``. ``--preset NAME`` picks the starting values and ``--config
FILE.json`` (a saved ``config.json``) replaces them. Parse errors raise ``UsageError`` (one line
with a close match), never print a usage block.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from typing import Any, Sequence

from unitscale_jax.paths import existing_file
from unitscale_jax.train.config import (
    OPTIONAL_SECTIONS,
    SECTIONS,
    Config,
    FinetuneConfig,
    field_type,
)
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.precision import PRECISIONS
from unitscale_jax.train.presets import PRESETS, get_preset


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are ``UsageError`` (one line)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")

    def parse_all(self, argv: Sequence[str]) -> argparse.Namespace:
        ns, extra = self.parse_known_args(argv)
        if extra:
            known = [o for a in self._actions for o in a.option_strings]
            hints = []
            for e in extra:
                close = difflib.get_close_matches(e.split("=")[0], known, n=1)
                hints.append(f"{e}" + (f" (did you mean {close[0]}?)" if close else ""))
            raise UsageError(f"unknown option(s): {', '.join(hints)} "
                             f"(see {self.prog} --help)")
        return ns


def _number(base: type, optional: bool, flag: str):
    def parse(text: str):
        t = text.strip().lower()
        if optional and t in ("none", "null", ""):
            return None
        try:
            if base is int:
                return int(t)
            if "^" in t or "**" in t:
                a, b = t.replace("**", "^").split("^")
                return float(a) ** float(b)
            return float(t)
        except ValueError:
            kind = "an integer" if base is int else "a number"
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {kind}" + (" (or 'none')" if optional else "")) from None
    parse.__name__ = base.__name__
    return parse


def _string(optional: bool):
    def parse(text: str):
        return None if optional and text.strip().lower() in ("none", "null") else text
    parse.__name__ = "str"
    return parse


def _optional_bool(text: str):
    t = text.strip().lower()
    if t in ("none", "null", "auto"):
        return None
    if t in ("1", "true", "yes", "on"):
        return True
    if t in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true, false or none")


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag", "--" + field.name.replace("_", "-"))


def add_config_flags(parser: argparse.ArgumentParser, base: Config, *,
                     sections: Sequence[str] = tuple(SECTIONS),
                     skip: Sequence[str] = ()) -> None:
    """Adds one flag per config field (defaults from ``base``), grouped by section.

    Args:
      sections: the sections whose fields become flags (``base`` must have each).
      skip: flags (``"--flag"``) or fields (``"section.field"``) left out (their fields keep
        ``base``'s values).
    """
    seen = set()
    classes = {**SECTIONS, **OPTIONAL_SECTIONS}
    for section in sections:
        klass = classes[section]
        group = parser.add_argument_group(section)
        obj = getattr(base, section)
        for f in dataclasses.fields(klass):
            flag = flag_name(f)
            if flag in skip or f"{section}.{f.name}" in skip:
                continue
            assert flag not in seen, f"duplicate flag {flag}"
            seen.add(flag)
            dest = f"{section}.{f.name}"
            default = getattr(obj, f.name)
            typ, optional = field_type(klass, f)
            help_ = f.metadata.get("help", "").replace("%", "%%") + " (default: %(default)s)"
            choices = f.metadata.get("choices")
            if f.name == "precision":
                choices = tuple(PRECISIONS)
            if typ is bool and not optional:
                group.add_argument(flag, dest=dest, default=default,
                                   action=argparse.BooleanOptionalAction, help=help_)
            elif typ is bool:
                group.add_argument(flag, dest=dest, default=default, help=help_,
                                   metavar="{true,false,none}", type=_optional_bool)
            elif typ is list:  # repeatable: --flag A --flag B
                group.add_argument(flag, dest=dest, default=default, help=help_,
                                   action="append", metavar="STR")
            elif typ in (int, float):
                group.add_argument(flag, dest=dest, default=default, help=help_,
                                   type=_number(typ, optional, flag), metavar=typ.__name__.upper())
            else:
                group.add_argument(flag, dest=dest, default=default, help=help_,
                                   type=_string(optional), choices=choices,
                                   metavar=("{" + ",".join(choices) + "}") if choices else "STR")


def _base_config(argv: Sequence[str], prog: str) -> tuple[Config, list[str]]:
    pre = Parser(prog=prog, add_help=False)
    pre.add_argument("--preset", default="tiny")
    pre.add_argument("--config", default=None)
    ns, rest = pre.parse_known_args(argv)
    if ns.config:
        path = existing_file(ns.config, "--config", "a config.json file (a run's, or one "
                             "written like it)")
        try:
            base = Config.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, AttributeError) as e:
            raise UsageError(f"--config {path}: not a valid config file ({e}).") from None
    else:
        base = get_preset(ns.preset)
    return base, rest


def train_parser(base: Config, prog: str = "unitscale-jax train") -> Parser:
    p = Parser(prog=prog, description="Train a unit-scaled / u-muP Transformer. Every config "
               "field is a flag; rerunning the same command resumes from the last checkpoint.")
    p.add_argument("--preset", default=base.preset, choices=tuple(PRESETS),
                   help="starting configuration (default: %(default)s)")
    p.add_argument("--config", default=None, help="a saved config.json to start from")
    add_config_flags(p, base)
    return p


def _config_from(ns: argparse.Namespace, base: Config) -> Config:
    values: dict[str, dict[str, Any]] = {
        s: dict(v) for s, v in base.to_dict().items() if s != "preset"}
    for key, value in vars(ns).items():
        if "." in key:
            section, name = key.split(".", 1)
            values[section][name] = value
    return Config.from_dict({**values, "preset": ns.preset if not ns.config else base.preset})


def parse_train_args(argv: Sequence[str], prog: str = "unitscale-jax train") -> Config:
    """``Config`` from command-line arguments (preset, then config file, then flags)."""
    base, _ = _base_config(argv, prog)
    ns = train_parser(base, prog).parse_all(argv)
    return _config_from(ns, base)


FINETUNE_SKIP = ("--model", "--packing", "--validation-fraction", "--text-key",
                 "--mask-prob", "--noise-density", "--mean-span", "--eval-batches",
                 "--data-shards", "--pipeline-stages", "--microbatches", "--pipeline-schedule",
                 "--pipeline-chunks")
"""``train`` flags that mean nothing for fine-tuning (the model is an encoder; the whole dev
split is evaluated; pipeline parallelism is ``train``'s)."""


def finetune_parser(base: Config, prog: str = "unitscale-jax finetune") -> Parser:
    p = Parser(prog=prog, description="Fine-tune an encoder on sentence classification or "
               "token classification (NER), from scratch or from a 'train --model encoder' run "
               "(--init-from). --data DIR finds train.* / dev.* / test.* there. Rerunning the "
               "same command resumes.")
    p.add_argument("--preset", default=base.preset, choices=tuple(PRESETS),
                   help="starting configuration (default: %(default)s)")
    p.add_argument("--config", default=None, help="a saved config.json to start from")
    add_config_flags(p, base, sections=("finetune", *SECTIONS), skip=FINETUNE_SKIP)
    return p


def parse_finetune_args(argv: Sequence[str], prog: str = "unitscale-jax finetune") -> Config:
    """``Config`` of a fine-tuning run (``finetune`` section set, ``--model encoder``).

    With ``--init-from RUN_OR_FILE``, the model flags and ``--tokenizer`` default to that
    run's (or the run an exported file records), so only the fine-tuning options need giving.

    Raises:
      UsageError: bad flags, or an ``--init-from`` that holds no run.
    """
    from unitscale_jax.train.interop import source_config
    from unitscale_jax.train.multitask import multitask_argv
    argv = multitask_argv(argv)
    base, _ = _base_config(argv, prog)
    pre = Parser(prog=prog, add_help=False)
    pre.add_argument("--init-from", default=None)
    known, _ = pre.parse_known_args(argv)
    if base.finetune is None:
        base = base.replace(finetune=dataclasses.asdict(FinetuneConfig()))
    if known.init_from and known.init_from.lower() not in ("none", "null"):
        pretrained = source_config(known.init_from, "--init-from")
        base = base.replace(model=pretrained.to_dict()["model"],
                            data={"tokenizer": pretrained.data.tokenizer})
    base = base.replace(model={"kind": "encoder"})
    cfg = _config_from(finetune_parser(base, prog).parse_all(argv), base)
    if cfg.finetune.tasks:
        from unitscale_jax.train.multitask import check_multitask_config
        check_multitask_config(cfg)
    return cfg


def evaluate_parser(prog: str = "unitscale-jax evaluate") -> Parser:
    p = Parser(prog=prog, description="Score a fine-tuned run on a labelled file: prints the "
               "report table and writes report.json (and a confusion-matrix PNG for "
               "classification).")
    p.add_argument("--run-dir", required=True, help="the fine-tuning run directory")
    p.add_argument("--data", required=True, help="a labelled file in the run's format")
    p.add_argument("--out", default=None, help="the report to write (default: "
                   "RUN_DIR/report.json; RUN_DIR/report_NAME.json with --task NAME)")
    p.add_argument("--step", type=_number(int, True, "--step"), default=None,
                   help="checkpoint step to load (default: the best by the dev score)")
    _head_option(p, "score")
    return p


def _head_option(p: Parser, verb: str) -> None:
    """``--task NAME``: the head of a multi-task run (``finetune --task NAME=KIND:PATH``)."""
    p.add_argument("--task", dest="task_name", metavar="NAME", default=None,
                   help=f"the task to {verb}, for a multi-task run (finetune --task "
                   "NAME=KIND:PATH ...); needed when it has several")


def predict_parser(prog: str = "unitscale-jax predict") -> Parser:
    p = Parser(prog=prog, description="Write a fine-tuned run's predictions: every input line "
               "with its columns unchanged and a predicted column appended (a 'prediction' "
               "column for TSV/CSV/JSONL; a tag column for CoNLL).")
    p.add_argument("--run-dir", required=True, help="the fine-tuning run directory")
    p.add_argument("--data", required=True, help="the input file (labels not needed)")
    p.add_argument("--out", required=True, help="the file to write (written atomically)")
    p.add_argument("--step", type=_number(int, True, "--step"), default=None,
                   help="checkpoint step to load (default: the best by the dev score)")
    _head_option(p, "predict")
    return p


def sample_parser(prog: str = "unitscale-jax sample") -> Parser:
    """Flags of ``unitscale-jax sample``. The sampling options left out are absent from the
    namespace (their defaults depend on the run's model kind: ``train.sample.DEFAULTS``)."""
    p = Parser(prog=prog, description="Predictions of a trained run: a decoder continues "
               "--prompt; an encoder fills each <mask> of it (fill-mask); an encdec fills "
               "each <mask> span of it (seq2seq generation).")
    p.add_argument("--run-dir", required=True, help="the run directory (with config.json)")
    p.add_argument("--prompt", default="", help="text to continue (default: a new document), "
                   "or with one <mask> per masked token (encoder) or span (encdec)")
    unset = argparse.SUPPRESS
    p.add_argument("--max-new-tokens", type=_number(int, False, "--max-new-tokens"),
                   default=unset, help="tokens to generate (default: 200; encdec: the "
                   "training target length, also the most allowed)")
    p.add_argument("--temperature", type=_number(float, False, "--temperature"), default=unset,
                   help="softmax temperature, 0 for greedy (default: 0.8)")
    p.add_argument("--top-k", type=_number(int, True, "--top-k"), default=unset,
                   help="sample among the k most likely tokens, none for all (default: 40); "
                        "encoder: the candidates listed per mask (default: 5)")
    p.add_argument("--num-samples", type=_number(int, False, "--num-samples"), default=unset,
                   help="independent samples (default: 1)")
    p.add_argument("--seed", type=_number(int, False, "--seed"), default=unset,
                   help="sampling seed (default: 0)")
    p.add_argument("--report-words", action="store_true", default=unset,
                   help="decoder: after each sample, how many of its words occur in the "
                        "run's training text")
    p.add_argument("--step", type=_number(int, True, "--step"), default=None,
                   help="checkpoint step to load (default: the latest valid one)")
    return p


def tokenizer_train_parser(prog: str = "unitscale-jax tokenizer train") -> Parser:
    from unitscale_jax.data.tokenizers import TOKENIZER_KINDS
    p = Parser(prog=prog, description="Train a subword tokenizer (Hugging Face tokenizers) on "
               "local text; use it with --tokenizer hf:OUT.")
    p.add_argument("--data", required=True, action="append",
                   help="text files or globs, read line by line (repeatable; also "
                        "comma-separated)")
    p.add_argument("--kind", default="wordpiece", choices=TOKENIZER_KINDS,
                   help="wordpiece (BERT), bpe (byte-level, GPT-2) or unigram (SentencePiece) "
                        "(default: %(default)s)")
    p.add_argument("--vocab-size", type=_number(int, False, "--vocab-size"), default=8000,
                   help="vocabulary size, special tokens included (default: %(default)s)")
    p.add_argument("--out", required=True, help="the tokenizer.json to write")
    p.add_argument("--lowercase", action="store_true", help="lower-case the text first")
    p.add_argument("--min-frequency", type=_number(int, False, "--min-frequency"), default=2,
                   help="least count of a merged pair, wordpiece and bpe (default: %(default)s)")
    return p


def sample_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line (``sample_parser``), by name."""
    names = ("max_new_tokens", "temperature", "top_k", "num_samples", "seed", "report_words")
    return {n: getattr(ns, n) for n in names if hasattr(ns, n)}


def convert_parser(prog: str = "unitscale-jax convert") -> Parser:
    p = Parser(prog=prog, description="Turn a state dict of unit_scaling.TransformerDecoder "
               "(the authors' PyTorch library) into a run directory that sample, train "
               "(resume) and export accept.")
    p.add_argument("--from-torch", required=True, metavar="CKPT",
                   help="the model's state_dict as .safetensors, or as a torch.save file "
                        "(.pt/.pth; needs torch)")
    p.add_argument("--config", required=True, metavar="CONFIG.json",
                   help="the torch model's hyperparameters (hidden_size, vocab_size, layers, "
                        "heads, dropout_p, residual_mult, residual_attn_ratio) and an optional "
                        "'run' section (a partial config.json); see "
                        "unitscale_jax.train.from_torch")
    p.add_argument("--run-dir", required=True, help="the new run directory")
    return p


def merge_parser(prog: str = "unitscale-jax merge") -> Parser:
    p = Parser(prog=prog, description="Fold a LoRA run's adapters into the base kernels and write "
               "the merged parameters as one file of the base model (train --init-from reads it).")
    p.add_argument("--run-dir", required=True, help="the LoRA run directory (with config.json)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the file to write (default: RUN_DIR/merged.safetensors)")
    p.add_argument("--step", type=_number(int, True, "--step"), default=None,
                   help="checkpoint step to merge (default: the latest valid one; for a "
                        "fine-tuning run its best)")
    return p


def export_parser(prog: str = "unitscale-jax export") -> Parser:
    from unitscale_jax.train.interop import FORMATS
    p = Parser(prog=prog, description="Write the parameters of a run's checkpoint, with their "
               "u-muP metadata and the model config, to one file (train --init-from reads it).")
    p.add_argument("--run-dir", required=True, help="the run directory (with config.json)")
    p.add_argument("--format", default="safetensors", choices=FORMATS,
                   help="file format (default: %(default)s)")
    p.add_argument("--out", default=None, metavar="FILE",
                   help="the file to write (default: RUN_DIR/model.safetensors)")
    p.add_argument("--step", type=_number(int, True, "--step"), default=None,
                   help="checkpoint step to export (default: the latest valid one)")
    return p


def grow_parser(prog: str = "unitscale-jax grow") -> Parser:
    from unitscale_jax.train.grow import MODES
    p = Parser(prog=prog, description="Write a new run whose model is a finished run's, grown "
               "deeper (unitscale_jax.train.grow); train --config NEW/config.json trains it with "
               "the same learning rate.")
    p.add_argument("--from", dest="source", required=True, metavar="RUN_DIR",
                   help="the finished decoder or encoder run directory")
    p.add_argument("--depth", required=True, metavar="Kx",
                   help="depth factor: an integer >= 2 such as 2x")
    p.add_argument("--width", default=None, metavar="Kx",
                   help="width factor (not supported: an error says why)")
    p.add_argument("--mode", default="duplicate", choices=MODES,
                   help="layer i copies layer i // K (duplicate) or i %% n (interleave); "
                        "default: %(default)s")
    p.add_argument("--run-dir", required=True, help="the new run directory")
    p.add_argument("--steps", type=_number(int, True, "--steps"), default=None,
                   help="training steps of the new run (default: the source's)")
    return p


def prepare_parser(prog: str = "unitscale-jax prepare") -> Parser:
    from unitscale_jax.data.builders import DEFAULT_CHUNK_CHARS, DEFAULT_VALIDATION_FRACTION
    from unitscale_jax.data.prepared import DEFAULT_PIECE_BYTES
    p = Parser(prog=prog, description="Tokenize a text corpus once into sharded ArrayRecord "
               "files and a manifest.json (token counts per shard, the tokenizer's identity, "
               "the settings), for corpora larger than memory: train --data prepared:OUT "
               "--tokenizer T reads them by index, with no pass over the corpus at start-up. "
               "Files are cut at line breaks into pieces of about --piece-mb, which a process "
               "pool tokenizes (one piece -> a train and a validation shard; each chunk of "
               "--chunk-chars characters is one record). Rerunning the same command resumes an "
               "interrupted prepare: finished shards are skipped; the result does not depend "
               "on --workers.")
    p.add_argument("--data", required=True, action="append",
                   help="text files or globs (repeatable; also comma-separated)")
    p.add_argument("--tokenizer", default="bytes",
                   help="bytes, hf:PATH/tokenizer.json or sentencepiece:PATH.model; train with "
                        "the same one (default: %(default)s)")
    p.add_argument("--out", required=True, help="the directory to write (or to resume)")
    p.add_argument("--workers", type=_number(int, False, "--workers"), default=None,
                   help="processes, at most one per piece (default: the CPUs this process "
                        "may use, os.sched_getaffinity)")
    p.add_argument("--validation-fraction", type=_number(float, False, "--validation-fraction"),
                   default=DEFAULT_VALIDATION_FRACTION,
                   help="share of each piece's chunks held out for validation "
                        "(default: %(default)s)")
    p.add_argument("--chunk-chars", type=_number(int, False, "--chunk-chars"),
                   default=DEFAULT_CHUNK_CHARS,
                   help="characters per record, at most (default: %(default)s)")
    p.add_argument("--piece-mb", type=_number(float, False, "--piece-mb"),
                   default=DEFAULT_PIECE_BYTES / 2**20,
                   help="MiB of input per piece; a worker holds one in memory "
                        "(default: %(default)s)")
    return p


PLAN_SKIP = ("--sharding", "--tensor-parallel", "--distributed", "--run-dir", "--overwrite",
             "--progress", "--tensorboard", "--plot", "--checkpoint", "--checkpoint-every",
             "--keep-checkpoints", "--async-checkpointing", "--init-from", "--distill-from",
             "--distill-temperature", "--distill-weight", "--eval-every", "--eval-batches",
             "--log-every", "--data", "--data-dir", "--text-key", "--validation-fraction",
             "--packing", "--pipeline-stages", "--data-shards", "--coordinator-address",
             "--num-processes", "--process-id", "--init-timeout", "--heartbeat-timeout")
"""``train`` flags a plan has no use for: ``--mesh`` sets the sharding and the pipeline
stages, nothing is read, written or trained, and it runs in one process."""


def plan_parser(base: Config, prog: str = "unitscale-jax plan") -> Parser:
    from unitscale_jax.train.plan import ACCELERATORS
    p = Parser(prog=prog, description="Plan a run for a device mesh without the devices: "
               "compile its real train step for fake CPU devices (no weights allocated) and "
               "report per-device memory, FLOPs and collectives, and the step time and MFU "
               "predicted for an accelerator (unitscale_jax.train.plan).")
    p.add_argument("--preset", default=base.preset, choices=tuple(PRESETS),
                   help="starting configuration (default: %(default)s)")
    p.add_argument("--config", default=None, help="a saved config.json to start from")
    p.add_argument("--mesh", required=True, metavar="data=D,fsdp=F,tensor=T",
                   help="mesh axis sizes (left out: 1); their product is the device count")
    p.add_argument("--accelerator", default=None, choices=tuple(ACCELERATORS),
                   help="predict step time and MFU on this chip (default: no prediction)")
    p.add_argument("--vocab-size", type=_number(int, True, "--vocab-size"), default=None,
                   help="vocabulary (default: the preset's, 32000 for 1b/3b/7b, else the "
                        "tokenizer's)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the plan here")
    add_config_flags(p, base, skip=PLAN_SKIP)
    return p


def parse_plan_args(argv: Sequence[str], prog: str = "unitscale-jax plan"
                    ) -> tuple[Config, argparse.Namespace]:
    """``(config, namespace)`` of ``unitscale-jax plan`` (the namespace holds ``mesh``,
    ``accelerator``, ``vocab_size`` and ``json``)."""
    base, _ = _base_config(argv, prog)
    ns = plan_parser(base, prog).parse_all(argv)
    return _config_from(ns, base), ns
