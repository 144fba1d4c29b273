"""The trainer's typed configuration: four dataclasses, JSON round trip, validation.

``Config`` holds ``model`` (``ModelConfig``), ``data`` (``DataConfig``), ``optimizer``
(``OptimizerConfig``) and ``training`` (``TrainingConfig``). Every field becomes a command-line
flag (``unitscale_jax.train.flags``): the flag is ``--`` plus the field name with ``-`` for
``_``, except where a field's metadata names another (``ModelConfig.kind`` is ``--model``,
``OptimizerConfig.name`` is ``--optimizer``). A run saves its config as ``config.json``.
``ModelConfig`` is generated from ``unitscale_jax.nn.TransformerConfig`` (every field but those
in ``SET_BY_RUN``, plus ``kind``), so a new model field is a new flag without an edit here.

``None`` in a field means "the default for the rest of the config", resolved by
``resolve`` (e.g. ``lr=None`` -> 1.0 for u-muP Adam, 1e-3 for SP Adam).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from typing import Any, Optional

import docstring_parser

from unitscale_jax.ops.plain import ATTENTION_IMPLEMENTATIONS, ATTENTION_KINDS
from unitscale_jax.optim.mup import DEFAULT_BASE_FAN_IN
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.pipeline import SCHEDULES as PIPELINE_SCHEDULES
from unitscale_jax.train.tasks import TASKS

MODEL_KINDS = tuple(TASKS)
PARAMETRIZATIONS = ("umup", "sp", "mup")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "warmup_cosine", "exponential", "plateau")
SHARDINGS = ("dp", "fsdp", "tp", "fsdp_tp")
DISTRIBUTED = ("auto", "on", "off")


def _f(default: Any, help: str = "", *, flag: Optional[str] = None,
       choices: Optional[tuple] = None) -> Any:
    meta = {"help": help}
    if flag:
        meta["flag"] = flag
    if choices:
        meta["choices"] = choices
    return dataclasses.field(default=default, metadata=meta)


SET_BY_RUN = ("vocab_size", "max_seq_len", "dtype", "param_dtype", "precision")
"""``TransformerConfig`` fields the run sets itself: from the tokenizer, ``--seq-len`` and
``--precision`` (parameters stay float32)."""

MODEL_FIELDS: dict[str, tuple[type, Any, dict]] = {
    "kind": (str, "decoder", dict(help="decoder (causal LM), encoder (masked LM) or encdec "
                                  "(span corruption)", flag="--model", choices=MODEL_KINDS)),
    "parametrization": (str, "umup", dict(help="umup (unit-scaled muP), sp (standard) or mup "
                                          "(muP, with muP's Adam rule)",
                                          choices=PARAMETRIZATIONS)),
    "d_model": (int, 64, {}),
    "n_layers": (int, 2, {}),
    "n_heads": (int, 4, {}),
    "rope": (Optional[bool], None, dict(help="rotary positions (default: off for decoder, on "
                                        "otherwise)")),
    "mlp": (str, "swiglu", dict(choices=("swiglu", "gelu"))),
    "norm": (str, "rms", dict(choices=("rms", "layer"))),
    "attention_impl": (str, "auto", dict(choices=ATTENTION_IMPLEMENTATIONS)),
    "attention_kind": (str, "softmax", dict(choices=ATTENTION_KINDS)),
}
"""Where the trainer's model fields differ from ``TransformerConfig``'s: ``name -> (type,
default, metadata)``; ``kind`` is the trainer's own."""


def _first_sentence(text: str) -> str:
    text = " ".join(text.replace("``", "").split())
    return re.split(r"(?<=\.)\s+(?=[A-Z])", text)[0].rstrip(".")


def _model_config() -> type:
    """``ModelConfig``: ``kind`` plus every ``TransformerConfig`` field of a flag's type that
    the run does not set itself, its help the first sentence of ``TransformerConfig``'s
    docstring, its type and default ``TransformerConfig``'s unless ``MODEL_FIELDS`` says
    otherwise."""
    from unitscale_jax import nn
    config = nn.TransformerConfig
    doc = {p.arg_name: _first_sentence(p.description or "")
           for p in docstring_parser.parse(config.__doc__ or "").params}
    hints = typing.get_type_hints(config)
    fields = [("kind", str, _f("decoder", **MODEL_FIELDS["kind"][2]))]
    for f in dataclasses.fields(config):
        if f.name in SET_BY_RUN:
            continue
        typ, default, meta = MODEL_FIELDS.get(f.name, (hints[f.name], f.default, {}))
        if _base_type(typ) not in (bool, int, float, str):
            continue  # not expressible as a flag (tests/train/test_build.py lists these)
        meta = {"help": doc.get(f.name, ""), **meta}
        fields.append((f.name, typ, _f(default, **meta)))
    cls = dataclasses.make_dataclass("ModelConfig", fields)
    cls.__module__ = __name__
    cls.__doc__ = ("The model: which Transformer (``kind``) and every field of "
                   "``unitscale_jax.nn.TransformerConfig`` except those in ``SET_BY_RUN``.")
    return cls


def _base_type(hint) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


ModelConfig = _model_config()


@dataclasses.dataclass
class DataConfig:
    """The data: source, tokenizer, sequence length and objective parameters."""

    data: Optional[str] = _f(None, "text file or glob (comma-separated for several), "
                             "tfds:NAME, or prepared:DIR (a corpus tokenized by unitscale-jax "
                             "prepare); default: the built-in corpus (pydoc_data.topics)")
    tokenizer: str = _f("bytes", "tokenizer name (see unitscale_jax.data.get_tokenizer)")
    seq_len: int = _f(64, "tokens per sequence")
    packing: str = _f("pack", "pack documents into rows, or crop one per row",
                      choices=("pack", "crop"))
    validation_fraction: float = _f(0.05, "share of local text held out for validation")
    data_dir: Optional[str] = _f(None, "tfds data directory (default: tfds' own)")
    text_key: Optional[str] = _f(None, "text feature of a tfds dataset")
    mask_prob: float = _f(0.15, "masked-LM selection probability (encoder)")
    noise_density: float = _f(0.15, "span-corruption noise density (encdec)")
    mean_span: float = _f(3.0, "span-corruption mean span length (encdec)")
    data_shards: Optional[int] = _f(None, "record shards the data is read in: shard k reads "
                                    "records k::N and gives batch_size/N rows of every batch, "
                                    "each process reads the shards of its rows; runs with the "
                                    "same value read the same batches on any number of "
                                    "processes (default: one per process, or a checkpoint's "
                                    "count when resuming)")


@dataclasses.dataclass
class OptimizerConfig:
    """The optimizer and learning-rate schedule."""

    name: str = _f("adamw", "optimizer (u-muP and muP runs use unitscale_jax.optim's, SP runs "
                   "optax's)", flag="--optimizer", choices=OPTIMIZERS)
    lr: Optional[float] = _f(None, "peak learning rate (default: 1.0 for u-muP Adam(W), 0.5 "
                             "for u-muP SGD; 1e-3 for SP and muP Adam(W), 0.1 for SP SGD)",
                             flag="--lr")
    schedule: str = _f("warmup_cosine", "learning-rate schedule", choices=SCHEDULES)
    warmup_steps: Optional[int] = _f(None, "warmup steps (default: 10% of steps, at most 1000)")
    end_lr_fraction: float = _f(0.1, "final / peak learning rate (warmup_cosine, exponential)")
    plateau_factor: float = _f(0.5, "reduce_on_plateau: factor per plateau")
    plateau_patience: int = _f(5, "reduce_on_plateau: evaluations without improvement")
    plateau_accumulation: int = _f(10, "reduce_on_plateau: training losses averaged per "
                                   "evaluation")
    weight_decay: Optional[float] = _f(None, "weight decay (default: adamw 1e-4 u-muP "
                                       "(independent) / 0.01 SP and muP (decoupled); else 0)")
    b1: float = _f(0.9, "Adam beta1")
    b2: float = _f(0.999, "Adam beta2")
    eps: float = _f(1e-8, "Adam epsilon")
    momentum: Optional[float] = _f(0.9, "SGD momentum (None: plain SGD)")
    grad_clip: Optional[float] = _f(None, "clip gradients to this global norm")
    unit_scale_grads: bool = _f(False, "chain unitscale_jax.optim.unit_scale() first")
    mup_base_fan_in: int = _f(DEFAULT_BASE_FAN_IN, "muP runs: the fan-in at which a hidden "
                              "weight takes --lr itself (others get --lr * base / fan_in)")


@dataclasses.dataclass
class TrainingConfig:
    """The run: steps, batch, evaluation, checkpoints, precision, sharding, outputs."""

    steps: int = _f(200, "training steps")
    batch_size: int = _f(16, "global batch size (sequences per step, over all devices)")
    eval_every: int = _f(50, "evaluate every this many steps (0: only at the end)")
    eval_batches: int = _f(4, "validation batches per evaluation")
    log_every: int = _f(1, "write training metrics every this many steps")
    checkpoint_every: Optional[int] = _f(None, "save a checkpoint every this many steps "
                                         "(default eval_every; 0: only at the end)")
    checkpoint: bool = _f(True, "write checkpoints (needed to resume)")
    keep_checkpoints: int = _f(3, "latest checkpoints kept (older ones are deleted)")
    async_checkpointing: bool = _f(True, "write checkpoints in the background")
    seed: int = _f(0, "seed of the initialisation, data order and dropout")
    init_from: Optional[str] = _f(None, "start from the parameters of this run directory "
                                  "(its newest valid checkpoint) or .safetensors file (written "
                                  "by unitscale-jax export) instead of at random; finetune "
                                  "takes the encoder trunk (embedding, layers, final norm) of "
                                  "a 'train --model encoder' run, with fresh task heads; "
                                  "unused when the run resumes from a checkpoint")
    distill_from: Optional[str] = _f(None, "distil from the teacher in this run directory "
                                     "(its newest valid checkpoint; finetune: a fine-tuning "
                                     "run's best one): the loss is a*T^2*KL(teacher || student "
                                     "at temperature T) + (1-a)*CE; same tokenizer and kind, "
                                     "any width and depth")
    distill_temperature: float = _f(1.0, "distillation temperature T (> 0)")
    distill_weight: float = _f(0.5, "distillation weight a in [0, 1] (1: the teacher only, 0: "
                               "the labels only)")
    run_dir: Optional[str] = _f(None, "output directory (default runs/<preset>-<model>-"
                                "<parametrization>); rerunning resumes from its checkpoint")
    precision: str = _f("fp32", "number format policy (see unitscale_jax.train.precision)")
    loss_scale: Optional[float] = _f(None, "static loss scale S (e.g. 2^10) for SP runs in "
                                     "fp16/fp8: differentiate S*loss, divide the gradients by "
                                     "S; overflowing steps are skipped (None: no scaling)")
    sharding: str = _f("dp", "dp (data parallel), fsdp, tp (tensor parallel) or fsdp_tp",
                       choices=SHARDINGS)
    tensor_parallel: Optional[int] = _f(None, "devices per tensor-parallel group (default: "
                                        "the most that divide the devices, heads, MLP width "
                                        "and vocabulary; at most 2 for fsdp_tp)")
    pipeline_stages: int = _f(1, "pipeline-parallel stages: the scanned layer stack split over "
                              "a 'stage' mesh axis of this size (unitscale_jax.train.pipeline); "
                              "must divide the devices and --n-layers")
    microbatches: Optional[int] = _f(None, "microbatches per step of the pipeline (default: "
                                     "--pipeline-stages); must divide each data-parallel "
                                     "replica's rows of the batch")
    pipeline_schedule: str = _f("gpipe", "gpipe, or circular (--pipeline-chunks layer chunks "
                                "per stage, a smaller bubble)", choices=PIPELINE_SCHEDULES)
    pipeline_chunks: Optional[int] = _f(None, "layer chunks per stage (circular; default 2; "
                                        "gpipe has 1)")
    distributed: str = _f("auto", "jax.distributed.initialize: auto (when a cluster "
                          "environment is detected), on or off", choices=DISTRIBUTED)
    coordinator_address: Optional[str] = _f(None, "multi-process run started by hand: "
                                            "HOST:PORT of process 0's coordinator (with "
                                            "--num-processes and --process-id, on every "
                                            "process; see unitscale_jax.train.distributed)")
    num_processes: Optional[int] = _f(None, "multi-process run started by hand: the number "
                                      "of processes")
    process_id: Optional[int] = _f(None, "multi-process run started by hand: this process's "
                                   "index in [0, --num-processes)")
    init_timeout: int = _f(300, "multi-process: seconds to wait for every process to join")
    heartbeat_timeout: int = _f(100, "multi-process: seconds without a heartbeat after which "
                                "a process counts as dead (the others then stop)")
    progress: bool = _f(True, "show a progress bar")
    tensorboard: bool = _f(True, "write TensorBoard event files")
    plot: bool = _f(True, "write a PNG of the loss curves at the end")
    overwrite: bool = _f(False, "delete an existing run in run_dir instead of resuming it")


FINETUNE_TASKS = ("classify", "tag")
POOLINGS = ("cls", "mean")
TAG_SCHEMES = ("iob2", "iob1", "iobes")


@dataclasses.dataclass
class FinetuneConfig:
    """Fine-tuning an encoder on labelled data (``unitscale-jax finetune``): the task, the
    split files and their columns, the trunk's initialisation and early stopping. ``--data``
    (``DataConfig.data``) names a directory of ``train.*`` / ``dev.*`` / ``test.*`` files, or a
    tfds dataset (``tfds:glue/sst2``; classification, its ``ClassLabel`` names the labels)."""

    task: str = _f("classify", "classify (sentence / sentence-pair labels) or tag (a tag per "
                   "word, CoNLL)", choices=FINETUNE_TASKS)
    train: Optional[str] = _f(None, "training file (default: train.* in --data)")
    dev: Optional[str] = _f(None, "dev file evaluated every --eval-every steps (default: dev.* "
                            "or validation.* in --data)")
    test: Optional[str] = _f(None, "test file scored with the best checkpoint at the end "
                             "(default: test.* in --data, if any)")
    text_column: Optional[list] = _f(None, "classify: a text column, name or 0-based index "
                                     "(repeat for sentence pairs; default: the GLUE layout)")
    label_column: Optional[str] = _f(None, "classify: the label column, name or 0-based index "
                                     "(default: label)")
    tag_column: Optional[int] = _f(None, "tag: the 0-based tag column (default: the last)")
    header: bool = _f(True, "TSV/CSV files have a header row (--no-header: they do not)")
    scheme: str = _f("iob2", "tag scheme the tags are checked against", choices=TAG_SCHEMES)
    pooling: str = _f("mean", "classify: sentence representation, the first token (cls) or "
                      "the mean of the real tokens (mean; learns faster from scratch, measured "
                      "on SST-2)", choices=POOLINGS)
    truncate: bool = _f(True, "cut examples longer than --seq-len (and report how many); "
                        "--no-truncate: an error instead")
    freeze_trunk: bool = _f(False, "train the task head only (a linear probe)")
    patience: Optional[int] = _f(None, "stop after this many evaluations without a better "
                                 "dev score (default: never)")
    tasks: Optional[list] = _f(None, "multi-task: a task NAME=KIND:PATH (KIND classify or tag, "
                               "PATH a split directory); written --task NAME=KIND:PATH, "
                               "repeated (unitscale_jax.train.multitask)")
    task_weight: Optional[list] = _f(None, "multi-task: NAME=W, the loss weight of a task "
                                     "(repeat; default 1 each)")
    task_sampling: str = _f("proportional", "multi-task: each step's rows per task, "
                            "proportional to the training sizes n, or temperature:T (n^(1/T))")


SECTIONS = {"model": ModelConfig, "data": DataConfig, "optimizer": OptimizerConfig,
            "training": TrainingConfig}
OPTIONAL_SECTIONS = {"finetune": FinetuneConfig}
"""Sections only some runs have (``None`` otherwise; left out of ``to_dict``)."""

# Fields that may change between a run and its resumption (they do not change what the
# checkpointed state means).
RESUMABLE_CHANGES = {("training", f) for f in (
    "steps", "eval_every", "eval_batches", "log_every", "checkpoint_every", "keep_checkpoints",
    "async_checkpointing", "run_dir", "progress", "tensorboard", "plot", "overwrite",
    "distributed", "coordinator_address", "num_processes", "process_id", "init_timeout",
    "heartbeat_timeout")} | {("finetune", "patience")}


@dataclasses.dataclass
class Config:
    """A complete training configuration (``preset`` records which preset it started from)."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    training: TrainingConfig = dataclasses.field(default_factory=TrainingConfig)
    preset: str = "tiny"
    finetune: Optional[FinetuneConfig] = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for name in OPTIONAL_SECTIONS:
            if d[name] is None:
                del d[name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        """Builds a config from ``to_dict`` output; unknown keys are an error."""
        unknown = set(d) - set(SECTIONS) - set(OPTIONAL_SECTIONS) - {"preset"}
        if unknown:
            raise UsageError(f"config has unknown section(s) {sorted(unknown)}; expected "
                             f"{sorted(SECTIONS)}, 'preset' and optionally "
                             f"{sorted(OPTIONAL_SECTIONS)}.")
        parts = {}
        for name, klass in {**SECTIONS, **OPTIONAL_SECTIONS}.items():
            if name in OPTIONAL_SECTIONS and d.get(name) is None:
                continue
            values = dict(d.get(name, {}))
            known = {f.name for f in dataclasses.fields(klass)}
            bad = set(values) - known
            if bad:
                raise UsageError(f"config section {name!r} has unknown field(s) {sorted(bad)}.")
            parts[name] = klass(**values)
        return cls(**parts, preset=d.get("preset", "tiny"))

    def replace(self, **sections: dict) -> "Config":
        """A copy with fields of some sections changed: ``cfg.replace(training={"steps": 5})``."""
        d = self.to_dict()
        for name, values in sections.items():
            if name == "preset":
                d["preset"] = values
                continue
            if name not in SECTIONS and name not in OPTIONAL_SECTIONS:
                raise UsageError(f"unknown config section {name!r}; use one of {sorted(SECTIONS)}.")
            d[name] = {**(d.get(name) or {}), **values}
        return Config.from_dict(d)


def field_type(klass, field: dataclasses.Field) -> tuple[type, bool]:
    """``(base type, optional)`` of a dataclass field (``Optional[int]`` -> ``(int, True)``)."""
    hint = typing.get_type_hints(klass)[field.name]
    args = typing.get_args(hint)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return hint, False


def validate(cfg: Config) -> None:
    """Checks types, choices and ranges of every field.

    Raises:
      UsageError: with the field's flag name, the bad value and what is allowed.
    """
    from unitscale_jax.train.precision import PRECISIONS
    for section, klass in {**SECTIONS, **OPTIONAL_SECTIONS}.items():
        obj = getattr(cfg, section)
        if obj is None:
            continue
        for f in dataclasses.fields(klass):
            value = getattr(obj, f.name)
            flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
            base, optional = field_type(klass, f)
            if value is None:
                if not optional:
                    raise UsageError(f"{flag} needs a value (it cannot be None).")
                continue
            ok = (isinstance(value, bool) if base is bool else
                  isinstance(value, int) and not isinstance(value, bool) if base is int else
                  isinstance(value, (int, float)) and not isinstance(value, bool)
                  if base is float else isinstance(value, base))
            if not ok:
                raise UsageError(f"{flag} must be a {base.__name__}, got {value!r}.")
            if base is float and not math.isfinite(value):
                raise UsageError(f"{flag} must be finite, got {value!r}.")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise UsageError(f"{flag} must be one of {', '.join(choices)}; got {value!r}.")
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.training
    positive = [("--d-model", m.d_model), ("--n-layers", m.n_layers), ("--n-heads", m.n_heads),
                ("--seq-len", d.seq_len), ("--steps", t.steps), ("--batch-size", t.batch_size),
                ("--eval-batches", t.eval_batches), ("--log-every", t.log_every),
                ("--keep-checkpoints", t.keep_checkpoints),
                ("--plateau-patience", o.plateau_patience),
                ("--plateau-accumulation", o.plateau_accumulation),
                ("--mup-base-fan-in", o.mup_base_fan_in)]
    for flag, v in positive:
        if v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}.")
    if d.seq_len < 2:
        raise UsageError(f"--seq-len must be >= 2, got {d.seq_len}.")
    for flag, v in [("--eval-every", t.eval_every), ("--checkpoint-every", t.checkpoint_every),
                    ("--warmup-steps", o.warmup_steps), ("--seed", t.seed)]:
        if v is not None and v < 0:
            raise UsageError(f"{flag} must be >= 0, got {v}.")
    if not 0 <= t.seed < 2**32:
        raise UsageError(f"--seed must be in [0, 2**32), got {t.seed}.")
    if m.parametrization == "mup" and o.name == "sgd":
        raise UsageError("--parametrization mup trains with muP's Adam rule only: use "
                         "--optimizer adam or adamw (muP's SGD rule is not implemented).")
    if o.lr is not None and not o.lr > 0:
        raise UsageError(f"--lr must be > 0, got {o.lr}.")
    if not 0 <= m.dropout < 1:
        raise UsageError(f"--dropout must be in [0, 1), got {m.dropout}.")
    if not 0 < d.validation_fraction <= 0.5:
        raise UsageError(f"--validation-fraction must be in (0, 0.5], got {d.validation_fraction}.")
    if not 0 < o.end_lr_fraction <= 1:
        raise UsageError(f"--end-lr-fraction must be in (0, 1], got {o.end_lr_fraction}.")
    if m.d_head is None and m.d_model % m.n_heads:
        raise UsageError(f"--d-model ({m.d_model}) is not divisible by --n-heads ({m.n_heads}); "
                         "change one of them or set --d-head.")
    if t.precision not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got "
                         f"{t.precision!r}.")
    if t.loss_scale is not None and not t.loss_scale > 0:
        raise UsageError(f"--loss-scale must be > 0 (e.g. 1024 or 2^10), got {t.loss_scale}.")
    if not t.distill_temperature > 0:
        raise UsageError(f"--distill-temperature must be > 0, got {t.distill_temperature}.")
    if not 0 <= t.distill_weight <= 1:
        raise UsageError(f"--distill-weight must be in [0, 1], got {t.distill_weight}.")
    if d.data_shards is not None and not (d.data_shards >= 1
                                          and t.batch_size % d.data_shards == 0):
        raise UsageError(f"--data-shards must be >= 1 and divide --batch-size "
                         f"({t.batch_size}), got {d.data_shards}.")
    if t.tensor_parallel is not None and t.tensor_parallel < 1:
        raise UsageError(f"--tensor-parallel must be >= 1, got {t.tensor_parallel}.")
    validate_pipeline(cfg.model, cfg.training)
    if cfg.finetune is not None:
        _validate_finetune(cfg)


def validate_pipeline(m: Any, t: TrainingConfig) -> None:
    """Checks the pipeline flags of ``t`` against the model ``m`` (a ``ModelConfig``): the
    stacked layers of ``--scan-layers``, stages (times chunks) dividing every stack's depth,
    circular microbatches a multiple of the stages.

    Raises:
      UsageError: naming the flags and what to change.
    """
    p, mb, chunks = t.pipeline_stages, t.microbatches, t.pipeline_chunks
    for flag, v in [("--pipeline-stages", p), ("--microbatches", mb),
                    ("--pipeline-chunks", chunks)]:
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}.")
    if p == 1:
        given = [f for f, v in [("--microbatches", mb not in (None, 1)),
                                ("--pipeline-schedule", t.pipeline_schedule != "gpipe"),
                                ("--pipeline-chunks", chunks not in (None, 1))] if v]
        if given:
            raise UsageError(f"{', '.join(given)} configure the pipeline: set "
                             "--pipeline-stages 2 or more (or leave them out).")
        return
    if not m.scan_layers:
        raise UsageError(f"--pipeline-stages {p} splits the stacked layers of --scan-layers; "
                         "drop --no-scan-layers.")
    v = chunks or (2 if t.pipeline_schedule == "circular" else 1)
    if t.pipeline_schedule == "gpipe" and v != 1:
        raise UsageError(f"--pipeline-chunks {v}: the gpipe schedule has one chunk per stage; "
                         "use --pipeline-schedule circular.")
    depths = {"--n-layers": m.n_layers}
    if m.kind == "encdec":
        depths["--n-decoder-layers"] = m.n_decoder_layers or m.n_layers
    for flag, n in depths.items():
        if n % (p * v):
            what = f"--pipeline-stages {p}" + (f" x --pipeline-chunks {v}" if v > 1 else "")
            raise UsageError(f"{what} does not divide {flag} {n} (every stage runs an equal "
                             "share of the layers); choose a divisor.")
    if t.pipeline_schedule == "circular" and (mb or p) % p:
        raise UsageError(f"--microbatches {mb}: the circular schedule needs a multiple of "
                         f"--pipeline-stages {p}.")


def _validate_finetune(cfg: Config) -> None:
    f, t = cfg.finetune, cfg.training
    if cfg.model.kind != "encoder":
        raise UsageError(f"fine-tuning trains an encoder; got --model {cfg.model.kind!r}.")
    if f.text_column is not None and not (1 <= len(f.text_column) <= 2
                                          and all(isinstance(c, str) for c in f.text_column)):
        raise UsageError(f"--text-column: give one (sentences) or two (sentence pairs), got "
                         f"{f.text_column!r}.")
    if f.patience is not None and f.patience < 1:
        raise UsageError(f"--patience must be >= 1 (or none), got {f.patience}.")
    if f.patience is not None and not t.eval_every:
        raise UsageError("--patience needs evaluations: set --eval-every N (> 0).")
    if t.checkpoint_every not in (None, t.eval_every):
        raise UsageError(f"--checkpoint-every {t.checkpoint_every}: fine-tuning saves a "
                         f"checkpoint at each evaluation (--eval-every {t.eval_every}), to keep "
                         "the best one; leave --checkpoint-every out.")


def _unit_scaled(parametrization: str) -> bool:
    from unitscale_jax.nn import get_parametrization
    return get_parametrization(parametrization).unit_scaled


def default_lr(parametrization: str, optimizer: str) -> float:
    """Default peak learning rate: u-muP's optimum sits near 2^0 for Adam at any width (u-muP
    paper, fig. 1); SP's moves with width, 1e-3 is a common middle for small models."""
    if _unit_scaled(parametrization):
        return 1.0 if optimizer in ("adam", "adamw") else 0.5
    return 1e-3 if optimizer in ("adam", "adamw") else 0.1


def resolve(cfg: Config) -> Config:
    """Fills every ``None`` that has a config-dependent default; validates the result."""
    validate(cfg)
    m, o, t = cfg.model, cfg.optimizer, cfg.training
    model = {"rope": m.kind != "decoder"} if m.rope is None else {}
    opt = {}
    if o.lr is None:
        opt["lr"] = default_lr(m.parametrization, o.name)
    if o.warmup_steps is None:
        opt["warmup_steps"] = min(1000, t.steps // 10)
    if o.weight_decay is None:
        opt["weight_decay"] = ((1e-4 if _unit_scaled(m.parametrization) else 0.01)
                               if o.name == "adamw" else 0.0)
    train = {}
    if t.microbatches is None:
        train["microbatches"] = t.pipeline_stages
    if t.pipeline_chunks is None:
        train["pipeline_chunks"] = 2 if t.pipeline_schedule == "circular" else 1
    if t.checkpoint_every is None:
        train["checkpoint_every"] = t.eval_every
    if t.run_dir is None:
        train["run_dir"] = (f"runs/{cfg.preset}-{m.kind}-{m.parametrization}"
                            if cfg.finetune is None else
                            f"runs/{cfg.preset}-finetune-{cfg.finetune.task}-{m.parametrization}")
    out = cfg.replace(model=model, optimizer=opt, training=train)
    if out.optimizer.schedule == "warmup_cosine" and out.optimizer.warmup_steps >= t.steps:
        raise UsageError(f"--warmup-steps ({out.optimizer.warmup_steps}) must be smaller than "
                         f"--steps ({t.steps}).")
    return out


def differences(old: Config, new: Config) -> list[str]:
    """Fields (``section.field: old -> new``) that differ and may not change on resumption."""
    out = []
    a, b = old.to_dict(), new.to_dict()
    for section in (*SECTIONS, *OPTIONAL_SECTIONS):
        if (section in a) != (section in b):
            out.append(f"{section}: {'set' if section in a else 'none'} -> "
                       f"{'set' if section in b else 'none'}")
            continue
        for k in a.get(section, {}):
            if (section, k) in RESUMABLE_CHANGES:
                continue
            if a[section][k] != b[section].get(k):
                out.append(f"{section}.{k}: {a[section][k]!r} -> {b[section].get(k)!r}")
    return out
