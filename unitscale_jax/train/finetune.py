"""Fine-tuning: ``unitscale-jax finetune | evaluate | predict``.

``FineTuner`` is a ``Trainer`` (the same loop, checkpoints, resumption, metrics, TensorBoard,
progress bar and loss plot) whose hooks train a ``TransformerEncoder`` with a fresh task head
on labelled data (``unitscale_jax.data.labelled``):

- the task is ``tasks.SequenceClassification`` (``--task classify``: TSV/CSV/JSONL) or
  ``tasks.TokenClassification`` (``--task tag``: CoNLL, the tag on each word's first subword);
- ``--init-from RUN_OR_FILE`` copies the trunk (``TRUNK``: embedding, layers, final norm) of a
  ``train --model encoder`` run, or of its exported ``.safetensors`` file, into the model at
  step 0 (``restore_trunk``; the architecture and the tokenizer must match,
  ``check_pretrained``); ``--freeze-trunk`` trains the heads only, the
  trunk's updates set to zero by ``optax.partition`` (the heads keep the u-muP optimizer's
  rules: the optimizer is the run's own, applied to the head subtree);
- every evaluation scores the whole dev split with the task metric (``scores.TASK_METRICS``:
  accuracy, or entity F1) and each checkpoint carries it, so the best one is kept next to the
  latest ones (``Checkpoints(best_metric=...)``); ``--patience N`` stops after N evaluations
  without a better score;
- at the end the best checkpoint scores the dev (and test) split: ``dev_report.json``,
  ``test_report.json`` and, for classification, ``confusion.png`` / ``test_confusion.png``.

``evaluate_run`` and ``predict_run`` load a finished run's best checkpoint (``load_finetuned``)
to score a labelled file (``report.json``) or to write predictions next to the input lines
(atomically: a temporary file renamed into place); of a multi-task run they use one task's
head (``--task NAME``, ``Head``: ``multitask.run_head``).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from unitscale_jax import data as datalib
from unitscale_jax import nn, paths
from unitscale_jax.data.labelled import DataError
from unitscale_jax.train import build, interop
from unitscale_jax.train import step as steplib
from unitscale_jax.train.checkpoint import Checkpoints
from unitscale_jax.train.config import Config, ModelConfig, resolve
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.lora_base import LoRABase, restore_into
from unitscale_jax.train.metrics import read_metrics
from unitscale_jax.train.plotting import plot_confusion
from unitscale_jax.train.run_dir import read_run_config
from unitscale_jax.train.scores import (
    TASK_METRICS,
    classification_scores,
    format_classification_report,
    format_tagging_report,
    tagging_scores,
)
from unitscale_jax.train.tasks import SequenceClassification, Task, TokenClassification
from unitscale_jax.train.trainer import Trainer, init_state_fn

TRUNK = ("embed", "stack", "final_norm")
"""The encoder's trunk: what ``--init-from`` copies and ``--freeze-trunk`` freezes (the rest,
``cls_head`` / ``token_head``, are the task heads)."""

NOT_ARCHITECTURE = ("kind", "dropout", "attention_impl", "check_ids", "remat", "lora_targets",
                    "lora_rank", "lora_mult")
"""``ModelConfig`` fields a fine-tuning run may set differently from its pretrained run (LoRA
adapters are new parameters on top of the pretrained trunk)."""

LABELS_FILE = "labels.json"


# --------------------------------------------------------------------------- data


def load_tokenizer(spec: str, flag: str = "--tokenizer"):
    """``data.get_tokenizer(spec)``; a missing or unreadable tokenizer is a ``UsageError``."""
    try:
        return datalib.get_tokenizer(spec)
    except (ValueError, FileNotFoundError, ImportError, OSError) as e:
        raise UsageError(f"{flag} {spec}: {e}") from None


def resolve_splits(cfg: Config) -> dict[str, Path]:
    """The split files: ``train.*`` / ``dev.*`` / ``test.*`` of ``--data DIR``, each replaced
    by ``--train`` / ``--dev`` / ``--test`` when given.

    Raises:
      UsageError: no training or no dev file, or a ``--data`` that is not a split directory.
    """
    f = cfg.finetune
    found: dict[str, Path] = {}
    if cfg.data.data is not None:
        try:
            found = datalib.find_splits(cfg.data.data)
        except DataError as e:
            raise UsageError(f"--data {cfg.data.data}: {e}") from None
    for split in ("train", "dev", "test"):
        if getattr(f, split) is not None:
            found[split] = Path(getattr(f, split))
    where = f" (none in --data {cfg.data.data})" if cfg.data.data is not None else ""
    for split in ("train", "dev"):
        if split not in found:
            raise UsageError(f"no {split} file{where}; pass --{split} FILE, or --data DIR with "
                             f"a {split}.* file in it.")
    return found


def is_tfds(data: Optional[str]) -> bool:
    """Whether ``--data`` names a tfds dataset (``tfds:NAME``) rather than a directory."""
    return isinstance(data, str) and data.startswith("tfds:")


def read_tfds_splits(cfg: Config, log: Callable[[str], None] = print
                     ) -> tuple[dict[str, tuple[str, Any]], datalib.LabelVocab]:
    """The splits of ``--data tfds:NAME`` (``labelled.read_tfds_classification``), as
    ``{split: (name, TextExamples)}``, and the label vocabulary (its ``ClassLabel`` names, or
    the training labels numbered by ``make_vocab``).

    Raises:
      UsageError: ``--task tag``, or ``--train`` / ``--dev`` / ``--test`` given as well.
      DataError: anything wrong with the dataset.
    """
    f = cfg.finetune
    if f.task != "classify":
        raise UsageError(f"--data {cfg.data.data}: tfds datasets are read for --task classify; "
                         "for --task tag pass CoNLL files (--data DIR or --train / --dev).")
    given = [f"--{s}" for s in ("train", "dev", "test") if getattr(f, s) is not None]
    if given:
        raise UsageError(f"--data {cfg.data.data} names every split; drop {' / '.join(given)} "
                         "(or pass files only).")
    ds = datalib.read_tfds_classification(cfg.data.data[len("tfds:"):],
                                          data_dir=cfg.data.data_dir,
                                          text_columns=f.text_column,
                                          label_column=f.label_column)
    if ds.unlabelled:
        log(f"{ds.name}: split(s) {', '.join(ds.unlabelled)} carry no labels; not scored")
    read = {split: (ex.path, ex) for split, ex in ds.splits.items()}
    return read, ds.vocab or make_vocab(cfg, ds.splits["train"])


def read_split(cfg: Config, path: str | os.PathLike, *, with_labels: bool = True):
    """``TextExamples`` (classify) or ``TaggedSentences`` (tag) of one file, read with the
    run's column settings.

    Raises:
      DataError: anything wrong with the file (one line, with file:line where it applies).
    """
    f = cfg.finetune
    if f.task == "classify":
        return datalib.read_classification(path, text_columns=f.text_column,
                                           label_column=f.label_column, no_header=not f.header,
                                           with_labels=with_labels)
    return datalib.read_conll(path, scheme=f.scheme, tag_column=f.tag_column,
                              with_tags=with_labels)


def make_vocab(cfg: Config, examples) -> datalib.LabelVocab:
    """The label vocabulary of the training split (every scheme tag of its entity types, for
    tagging)."""
    if cfg.finetune.task == "classify":
        vocab = datalib.LabelVocab.from_labels(examples.labels)
        if len(vocab) < 2:
            raise DataError(f"{examples.path}: one label ({vocab.labels[0]!r}) in the training "
                            "split; classification needs at least two.")
        return vocab
    return datalib.LabelVocab.for_tags((t for s in examples.tags for t in s), cfg.finetune.scheme)


def encode_split(cfg: Config, examples, tokenizer, vocab) -> datalib.labelled.Encoded:
    """Model inputs of one split (``encode_texts`` / ``encode_tagged``)."""
    kw = dict(vocab=vocab, truncate=cfg.finetune.truncate)
    if cfg.finetune.task == "classify":
        return datalib.encode_texts(examples, tokenizer, cfg.data.seq_len, **kw)
    return datalib.encode_tagged(examples, tokenizer, cfg.data.seq_len, **kw)


def make_task(cfg: Config, vocab: datalib.LabelVocab) -> Task:
    """The fine-tuning task of a run: its head's size from the label vocabulary."""
    if cfg.finetune.task == "classify":
        return SequenceClassification(len(vocab), cfg.finetune.pooling)
    return TokenClassification(len(vocab))


BATCH_KEYS = {"classify": ("ids", "mask", "labels"),
              "tag": ("ids", "mask", "labels", "where")}
"""The arrays of ``Encoded`` a model batch carries (plus ``valid``)."""


def _batches(cfg: Config, encoded, tokenizer, *, batch_size: int, split: str, name: str,
             train: bool):
    arrays = {k: encoded.arrays[k] for k in BATCH_KEYS[cfg.finetune.task]}
    kw = (dict(shuffle=True, seed=cfg.training.seed) if train else
          dict(shuffle=False, num_epochs=1, drop_remainder=False))
    return datalib.make_batch_iterator(arrays, batch_size=batch_size, tokenizer=tokenizer,
                                       name=name, split=split, task=cfg.finetune.task, **kw)


def _truncation_note(path, encoded, seq_len: int) -> Optional[str]:
    if not encoded.truncated:
        return None
    return (f"{path}: truncated {encoded.truncated} of {len(encoded)} examples longer than "
            f"--seq-len {seq_len} (pass --no-truncate to make that an error)")


@dataclasses.dataclass
class Split:
    """One split of a fine-tuning run: the file read, its encoding."""

    path: Path | str
    examples: Any
    encoded: Any


class LabelledData:
    """The labelled splits of a fine-tuning run, with the interface of ``train.data.RunData``
    (``vocab_size``, ``train_iterator``, ``eval_batches``) that ``Trainer`` uses.

    Raises:
      UsageError: a missing tokenizer or split, or any ``DataError`` of the files (a missing
        column, an empty file, a bad CoNLL line, a dev label never seen in training, ...).
    """

    bytes_per_token = float("nan")

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.cfg = cfg
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        try:
            if is_tfds(cfg.data.data):
                read, vocab = read_tfds_splits(cfg, log)
            else:
                self.paths = resolve_splits(cfg)
                train = read_split(cfg, self.paths["train"])
                read, vocab = {"train": (self.paths["train"], train)}, None
                read.update({name: (self.paths[name], read_split(cfg, self.paths[name]))
                             for name in ("dev", "test") if name in self.paths})
            self.vocab = vocab or make_vocab(cfg, read["train"][1])
            self.splits = {name: Split(path, ex, encode_split(cfg, ex, self.tokenizer,
                                                              self.vocab))
                           for name, (path, ex) in read.items()}
        except DataError as e:
            raise UsageError(str(e)) from None
        for split in self.splits.values():
            note = _truncation_note(split.path, split.encoded, cfg.data.seq_len)
            if note:
                log(note)
        sizes = ", ".join(f"{k} {len(v.encoded)}" for k, v in self.splits.items())
        log(f"data: {cfg.finetune.task}, {sizes} examples; {len(self.vocab)} "
            f"{'labels' if cfg.finetune.task == 'classify' else 'tags'} "
            f"({', '.join(self.vocab.labels[:8])}{', ...' if len(self.vocab) > 8 else ''}); "
            f"tokenizer {getattr(self.tokenizer, 'name', type(self.tokenizer).__name__)} "
            f"(vocabulary {self.tokenizer.vocab_size})")

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def train_iterator(self, cfg: Config, *, shard_index: int = 0, shard_count: int = 1):
        if shard_count != 1:
            raise UsageError("fine-tuning runs in one process (for now); run it without "
                             "jax.distributed (--distributed off).")
        s = self.splits["train"]
        if len(s.encoded) < cfg.training.batch_size:
            raise UsageError(f"{s.path}: {len(s.encoded)} training examples, fewer than "
                             f"--batch-size {cfg.training.batch_size}; lower --batch-size.")
        return _batches(cfg, s.encoded, self.tokenizer, batch_size=cfg.training.batch_size,
                        split="train", name=str(s.path), train=True)

    def eval_batches(self, cfg: Config, n: int = 0, split: str = "dev") -> list[dict]:
        """Every batch of one in-order pass over ``split`` (the last filled with padding
        rows, ``valid`` False); ``n`` is ignored: the whole split is scored."""
        s = self.splits[split]
        return list(_batches(cfg, s.encoded, self.tokenizer, batch_size=cfg.training.batch_size,
                             split=split, name=str(s.path), train=False))


# --------------------------------------------------------------------------- scoring


def predict_fn(graphdef, task: Task) -> Callable:
    """``(params, batch) -> (loss sums, predictions)`` in eval mode (to jit)."""

    def predict(params, batch):
        model = nnx.merge(graphdef, params)
        model.eval()
        return task.eval_sums(model, batch), task.predict(model, batch)

    return predict


def run_predictions(predict: Callable, params, batches: Sequence[dict], n: int,
                    put: Callable = lambda b: b) -> tuple[np.ndarray, float]:
    """Predictions of every row (``[n]`` classes or ``[n, seq]`` tags) and the mean loss."""
    preds, loss, count = [], 0.0, 0
    for b in batches:
        sums, p = predict(params, put(b))
        s, c = sums["loss"]
        loss, count = loss + float(s), count + int(c)
        preds.append(np.asarray(p))
    return np.concatenate(preds)[:n], loss / max(count, 1)


def score(cfg: Config, examples, encoded, pred: np.ndarray, vocab: datalib.LabelVocab
          ) -> tuple[dict, Any]:
    """``(scores, predicted labels)`` of one split's predictions: ``classification_scores``
    (class names per example) or ``tagging_scores`` (tags per word, against the file's full,
    untruncated sentences)."""
    if cfg.finetune.task == "classify":
        return (classification_scores(encoded.arrays["labels"], pred, vocab.labels),
                vocab.decode(pred))
    tags = datalib.tags_from_subwords(pred, encoded.arrays["word_index"], encoded.n_words, vocab)
    return tagging_scores(examples.tags, tags, scheme=cfg.finetune.scheme), tags


def row_values(task: str, scores: dict) -> dict[str, float]:
    """The scores a validation row of ``metrics.jsonl`` carries."""
    keys = ("accuracy", "macro_f1") if task == "classify" else ("precision", "recall", "f1")
    return {k: scores[k] for k in keys}


def format_report(task: str, scores: dict) -> str:
    return (format_classification_report(scores) if task == "classify" else
            format_tagging_report(scores))


def write_report(cfg: Config, scores: dict, path: Path, *, extra: dict,
                 confusion: Optional[Path] = None, title: str = "") -> dict:
    """Writes ``scores`` (and ``extra``) as JSON and, for classification, the confusion PNG."""
    report = {"task": cfg.finetune.task, **extra, **scores}
    if confusion is not None and cfg.finetune.task == "classify":
        plot_confusion(scores["confusion"], scores["labels"], confusion, title=title)
        report["confusion_png"] = str(confusion)
    _write_atomic(path, json.dumps(report, indent=2) + "\n")
    return report


# --------------------------------------------------------------------------- the trunk


def tokenizer_identity(spec: str) -> str:
    """What makes two ``--tokenizer`` specs the same tokenizer: the name, with a model file's
    path replaced by a hash of its contents."""
    kind, _, path = spec.partition(":")
    if path and os.path.isfile(path):
        return f"{kind}:{hashlib.sha256(Path(path).read_bytes()).hexdigest()}"
    return spec


def check_pretrained(cfg: Config, source: str | os.PathLike) -> Config:
    """The resolved config of the ``--init-from`` run (a run directory, or the run an exported
    file records), checked against the fine-tuning run.

    Raises:
      UsageError: not a ``train --model encoder`` run, or its architecture (every model
        field but ``NOT_ARCHITECTURE``) or tokenizer differs; the message lists each
        differing field.
    """
    flag = "--init-from"
    pre = interop.source_config(source, flag)
    if pre.finetune is not None or pre.model.kind != "encoder":
        what = (f"a fine-tuning run ({pre.finetune.task})" if pre.finetune is not None else
                f"a {pre.model.kind} run")
        raise UsageError(f"{flag} {source} is {what}; --init-from needs a pretrained encoder "
                         "run (unitscale-jax train --model encoder) or its exported file.")
    pre = resolve(pre)
    diffs = [f"{f.name} {getattr(pre.model, f.name)!r} (pretrained) vs "
             f"{getattr(cfg.model, f.name)!r}" for f in dataclasses.fields(ModelConfig)
             if f.name not in NOT_ARCHITECTURE
             and getattr(pre.model, f.name) != getattr(cfg.model, f.name)]
    if tokenizer_identity(pre.data.tokenizer) != tokenizer_identity(cfg.data.tokenizer):
        diffs.append(f"tokenizer {pre.data.tokenizer!r} (pretrained) vs {cfg.data.tokenizer!r}")
    if diffs:
        raise UsageError(f"{flag} {source}: the pretrained encoder differs from this model in "
                         f"{'; '.join(diffs)}; leave those flags out (they default to the "
                         "pretrained run's) or pretrain a matching encoder.")
    return pre


def _in_trunk(name: str) -> bool:
    return name.split(".", 1)[0] in TRUNK


def restore_trunk(source: str | os.PathLike, log: Callable[[str], None] = print
                  ) -> tuple[dict[str, np.ndarray], int]:
    """The trunk parameters (``{name: array}`` of the ``TRUNK`` entries, names as
    ``interop.flat_params``) of a pretrained encoder: a run directory's newest valid
    checkpoint or an exported file; and its step."""
    arrays, step, _ = interop.source_arrays(source, "--init-from", log)
    return {k: v for k, v in arrays.items() if _in_trunk(k)}, step


def with_trunk(params: dict, trunk: dict[str, np.ndarray], source: str) -> dict:
    """``params`` with its ``TRUNK`` entries replaced by ``trunk``'s (same names and shapes);
    LoRA adapters keep their fresh values.

    Raises:
      UsageError: the trunks differ (every missing, unexpected or reshaped entry listed).
    """
    flat = interop.flat_params(params)
    interop.check_arrays(trunk, {k: v for k, v in flat.items()
                                 if _in_trunk(k) and not nn.lora.is_adapter_name(k)},
                         f"--init-from {source}: the pretrained trunk",
                         "; pretrain with the same model flags")
    return interop.unflatten_like(params, {**flat, **trunk})


def freeze_labels(params: dict) -> dict:
    """``"frozen"`` for every trunk leaf but LoRA adapters', ``"train"`` for the heads' and the
    adapters' (``optax.partition``)."""
    return nn.lora.trainable_labels(params, [k for k in params if k not in TRUNK])


def finetune_optimizer(cfg: Config, abstract_model) -> tuple[optax.GradientTransformation,
                                                              Callable]:
    """The run's optimizer (``build.build_optimizer``: u-muP rules from the heads' and trunk's
    ``param_info``); with ``--freeze-trunk`` it updates the heads only and the trunk's
    updates are zero (``optax.partition`` with ``optax.set_to_zero``); with LoRA adapters
    (``--lora-targets``) the heads and the adapters train, the rest of the trunk is frozen."""
    tx, schedule = build.build_optimizer(cfg, nnx.to_pure_dict(nn.param_info(abstract_model)))
    if cfg.finetune.freeze_trunk or build.uses_lora(cfg):
        labels = freeze_labels(nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param)))
        tx = build.train_only(tx, labels)
    return tx, schedule


# --------------------------------------------------------------------------- the trainer


class FineTuner(Trainer):
    """Fine-tunes (or resumes fine-tuning) the run a ``Config`` with a ``finetune`` section
    describes; ``FineTuner(cfg).run()`` returns ``Trainer.run``'s summary plus ``best_step``,
    ``best_dev``, ``dev_report``, ``test_report`` and ``examples_per_s``.

    Raises:
      UsageError: bad options or data (one line).
    """

    def __init__(self, config: Config | dict, *, quiet: bool = False,
                 devices: Optional[Sequence[Any]] = None):
        given = Config.from_dict(config) if isinstance(config, dict) else config
        if given.finetune is None:
            raise UsageError("FineTuner needs a config with a finetune section "
                             "(flags.parse_finetune_args, or Config.replace(finetune={...})).")
        self.pretrained: Optional[Config] = None
        super().__init__(given, quiet=quiet, devices=devices)
        self.metric = TASK_METRICS[self.cfg.finetune.task]
        self._predict = jax.jit(predict_fn(self.graphdef, self.task),
                                in_shardings=(self.shardings["params"], self.par.batch),
                                out_shardings=self.par.replicated)
        self.best: Optional[tuple[float, int]] = None
        self.since_best = 0

    # hooks
    def _load_data(self):
        data = LabelledData(self.cfg, self.log)
        if self.cfg.training.init_from:
            self.pretrained = check_pretrained(self.cfg, self.cfg.training.init_from)
        return data

    def _make_task(self) -> Task:
        return self._distilled(make_task(self.cfg, self.data.vocab))

    def _make_optimizer(self, abstract_model):
        return finetune_optimizer(self.cfg, abstract_model)

    def _make_checkpoints(self) -> Checkpoints:
        t = self.cfg.training
        return Checkpoints(self.run_dir / "checkpoints", keep=t.keep_checkpoints,
                           async_save=t.async_checkpointing, log=self.log,
                           best_metric=TASK_METRICS[self.cfg.finetune.task])

    def _trainable_labels(self, params: Any) -> Any:
        return freeze_labels(params)

    def _initial_params(self) -> Optional[dict]:
        source = self.cfg.training.init_from
        if not source:
            return None
        trunk, step = restore_trunk(source, self.log)
        params = with_trunk(jax.device_get(self._fresh_state()["params"]), trunk, source)
        heads = sorted(k for k in params if k not in TRUNK)
        self.log(f"init: trunk ({', '.join(k for k in TRUNK if k in params)}) from "
                 f"{source} at step {step}; fresh {', '.join(heads)}"
                 + ("; the trunk is frozen" if self.cfg.finetune.freeze_trunk else ""))
        return params

    def build_state(self) -> int:
        start = super().build_state()
        if self.primary:
            (self.run_dir / LABELS_FILE).write_text(self.data.vocab.to_json() + "\n")
        for row in read_metrics(self.metrics_path):  # early stopping resumes where it was
            if row["split"] == "validation" and self.metric in row:
                self._track(row)
        return start

    def _track(self, row: dict) -> None:
        value, s = float(row[self.metric]), int(row["step"])
        if self.best is None or value > self.best[0]:
            self.best, self.since_best = (value, s), 0
        else:
            self.since_best += 1
        patience = self.cfg.finetune.patience
        if patience is not None and self.since_best >= patience:
            self.stop_reason = (f"early stop: no better dev {self.metric} in {patience} "
                                f"evaluation(s) (best {self.best[0]:.4f} at step {self.best[1]})")

    def evaluate(self, step: int) -> dict:
        """Scores the whole dev split; writes and returns the validation row (``loss`` and the
        task's scores)."""
        dev = self.data.splits["dev"]
        with self.par.context():
            pred, loss = run_predictions(self._predict, self.state["params"], self.eval_batches,
                                         len(dev.encoded),
                                         put=lambda b: steplib.put_batch(b, self.par))
        scores, _ = score(self.cfg, dev.examples, dev.encoded, pred, self.data.vocab)
        row = self.writer.write(step, "validation",
                                {"loss": loss, **row_values(self.cfg.finetune.task, scores)})
        self.history.append(row)
        self.last["validation"] = row
        self._track(row)
        parts = ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "split"))
        self.log(f"step {step}: dev {parts}")
        return row

    def save(self, step: int, *, force: bool = False) -> None:
        """A checkpoint at ``step``, ranked by the dev score when ``step`` was evaluated."""
        if self.ckpt is None:
            return
        row = self.last["validation"]
        metrics = ({k: v for k, v in row.items() if k not in ("step", "split")}
                   if row is not None and row["step"] == step else None)
        self.ckpt.save(step, self.checkpointed_state(), self.train_it.get_state(), force=force,
                       metrics=metrics)

    def run(self) -> dict[str, Any]:
        summary = super().run()
        return self._final_reports(summary)

    def _best_params(self) -> tuple[Any, int]:
        if self.ckpt is None:
            return self.state["params"], int(jax.device_get(self.state["step"]))
        ckpt = self._make_checkpoints()
        try:
            step = ckpt.best_step()
            if step is None:
                step = max(ckpt.steps())
            state, _ = self.restore_checkpoint(lambda target: ckpt.restore(step, target))
        finally:
            ckpt.close()
        return state["params"], step

    def _final_reports(self, summary: dict) -> dict:
        params, best = self._best_params()
        task, out = self.cfg.finetune.task, {"best_step": best}
        for name in ("dev", "test"):
            split = self.data.splits.get(name)
            if split is None or not self.primary:
                continue
            batches = self.eval_batches if name == "dev" else self.data.eval_batches(
                self.cfg, split=name)
            with self.par.context():
                pred, loss = run_predictions(self._predict, params, batches, len(split.encoded),
                                             put=lambda b: steplib.put_batch(b, self.par))
            scores, _ = score(self.cfg, split.examples, split.encoded, pred, self.data.vocab)
            png = self.run_dir / ("confusion.png" if name == "dev" else "test_confusion.png")
            write_report(self.cfg, scores, self.run_dir / f"{name}_report.json",
                         extra={"split": name, "data": str(split.path), "step": best,
                                "loss": loss}, confusion=png if self.cfg.training.plot else None,
                         title=f"{name} (step {best})")
            out[f"{name}_report"] = str(self.run_dir / f"{name}_report.json")
            out[f"best_{name}" if name == "dev" else "test"] = row_values(task, scores)
        tps = summary.get("tokens_per_s")
        out["examples_per_s"] = tps / self.cfg.data.seq_len if tps else None
        out["stop_reason"] = self.stop_reason
        summary.update(out)
        if self.primary:
            path = self.run_dir / "summary.json"
            saved = json.loads(path.read_text())
            path.write_text(json.dumps({**saved, **out}, indent=2) + "\n")
        return summary


def finetune(config: Config | dict, *, quiet: bool = False,
             devices: Optional[Sequence[Any]] = None) -> dict[str, Any]:
    """Fine-tunes (or resumes) the run of ``config`` (``FineTuner(config).run()``; with
    several ``--task NAME=KIND:PATH``, ``multitask.multitask_finetune``)."""
    given = Config.from_dict(config) if isinstance(config, dict) else config
    if given.finetune is not None and given.finetune.tasks:
        from unitscale_jax.train.multitask import multitask_finetune
        return multitask_finetune(given, quiet=quiet, devices=devices)
    return FineTuner(given, quiet=quiet, devices=devices).run()


def format_finetune_summary(s: dict) -> str:
    """The report printed at the end of ``unitscale-jax finetune``."""
    from unitscale_jax.train.loop import format_summary
    base = format_summary(s).split("\n")
    lines = [base[0], f"final train loss {s['final_train_loss']:.4f}, dev loss "
             f"{s['final_val_loss']:.4f}" if s["final_val_loss"] is not None else base[1]]
    if s.get("stop_reason"):
        lines.append(s["stop_reason"])
    eps = s.get("examples_per_s")
    lines.append(f"{'n/a' if eps is None else f'{eps:,.0f}'} examples/s; best checkpoint: "
                 f"step {s.get('best_step')}")
    for name, key in (("dev", "best_dev"), ("test", "test")):
        if s.get(key):
            lines.append(f"{name} (best checkpoint): "
                         + ", ".join(f"{k} {v:.4f}" for k, v in s[key].items()))
    lines += [x for x in base if x.startswith("  ")]
    for key in ("dev_report", "test_report"):
        if s.get(key):
            lines.append(f"  {key.replace('_', ' ') + ':':<13}{s[key]}")
    several = any(k.startswith("dev_report_") for k in s)  # a multi-task run's reports
    lines.append(f"  evaluate:    unitscale-jax evaluate --run-dir {s['run_dir']} --data FILE"
                 + (" --task NAME" if several else ""))
    return "\n".join(lines)


# --------------------------------------------------------------------------- a finished run


@dataclasses.dataclass
class Finetuned:
    """A fine-tuned run loaded for scoring or prediction: ``cfg``, ``vocab`` and ``predict``
    are those of one task head (``Head``), ``task`` the run's (its whole model)."""

    cfg: Config
    vocab: datalib.LabelVocab
    tokenizer: Any
    task: Task
    params: Any
    step: int
    predict: Callable
    task_name: Optional[str] = None


@dataclasses.dataclass
class Head:
    """The task head of a finished run that ``evaluate`` / ``predict`` score.

    Attributes:
      cfg: the head's single-task config (its ``--task`` kind, columns, tag scheme).
      vocab: its label set.
      task: the run's ``Task`` (what its model is: a ``multitask.MultiTask`` for a
        multi-task run).
      make_predict: ``graphdef -> predict(params, batch) -> (loss sums, predictions)`` of
        the head (to jit).
      best_metric: what ranks the run's checkpoints (the best one is loaded).
      name: the task's name in a multi-task run (None in a single-task run).
    """

    cfg: Config
    vocab: datalib.LabelVocab
    task: Task
    make_predict: Callable[[Any], Callable]
    best_metric: str
    name: Optional[str] = None


def read_labels(run_dir: Path, name: str = LABELS_FILE) -> datalib.LabelVocab:
    """The label vocabulary a run saved in ``run_dir/name``.

    Raises:
      UsageError: the file is missing or unreadable.
    """
    try:
        return datalib.LabelVocab.from_json((run_dir / name).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--run-dir {run_dir}: no readable {name} ({e}); the run never "
                         "started training.") from None


def _head(run_dir: Path, cfg: Config, task_name: Optional[str], vocab_size: int) -> Head:
    if cfg.finetune.tasks:
        from unitscale_jax.train.multitask import run_head
        return run_head(run_dir, cfg, task_name, vocab_size)
    if task_name is not None:
        raise UsageError(f"--task {task_name}: --run-dir {run_dir} is a single-task run (a "
                         f"{cfg.finetune.task} head); drop --task.")
    vocab = read_labels(run_dir)
    task = make_task(cfg, vocab)
    return Head(cfg, vocab, task, lambda graphdef: predict_fn(graphdef, task),
                TASK_METRICS[cfg.finetune.task])


def load_finetuned(run_dir: str | os.PathLike, *, step: Optional[int] = None,
                   log: Callable[[str], None] = print, task_name: Optional[str] = None,
                   multitask: bool = False) -> Finetuned:
    """A fine-tuning run's config, labels, tokenizer and parameters (its best checkpoint by
    the dev score, or ``step``).

    Args:
      run_dir: the run directory.
      step: the checkpoint to load (default the best).
      log: where notes go.
      task_name: the head of a multi-task run to score (``--task NAME``; needed when it has
        several labelled tasks); the run's one head by default.
      multitask: accept a multi-task run (``evaluate`` / ``predict``); else it is refused.

    Raises:
      UsageError: not a directory, not a fine-tuning run, a multi-task run (unless
        ``multitask``) without ``task_name`` naming one of its tasks, no checkpoint, no
        such step.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir} is a file; pass a fine-tuning run directory.")
    given = read_run_config(run_dir)
    if given.finetune is None:
        raise UsageError(f"--run-dir {run_dir} is not a fine-tuning run (it is a 'train "
                         f"--model {given.model.kind}' run); pass a run of 'unitscale-jax "
                         "finetune'.")
    if given.finetune.tasks and not multitask:
        raise UsageError(f"--run-dir {run_dir} is a multi-task run; only evaluate / predict "
                         "(with --task NAME) read one (its per-task scores are in "
                         "dev_report_NAME.json).")
    cfg = resolve(given)
    tokenizer = load_tokenizer(cfg.data.tokenizer, "tokenizer of the run:")
    head = _head(run_dir, cfg, task_name, tokenizer.vocab_size)
    task = head.task
    abstract_model = nnx.eval_shape(lambda: build.build_model(cfg, tokenizer.vocab_size,
                                                              task=task))
    graphdef, _ = nnx.split(abstract_model, nnx.Param)
    tx, _ = finetune_optimizer(cfg, abstract_model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                          jax.eval_shape(init_state_fn(cfg, tokenizer.vocab_size, tx, task)))
    ckpt_dir = run_dir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise UsageError(f"--run-dir {run_dir}: no checkpoints directory; the run saved none.")
    ckpt = Checkpoints(ckpt_dir, async_save=False, log=log,
                       best_metric=head.best_metric)
    base = LoRABase.read(run_dir) if build.uses_lora(cfg) else None
    try:
        have = ckpt.steps()
        if step is not None and step not in have:
            raise UsageError(f"--step {step}: no checkpoint at that step in {ckpt_dir} (have "
                             f"{have}).")
        if step is None:
            step = ckpt.best_step()
        if step is not None:
            at = step
            state, _ = restore_into(base, run_dir, target, lambda t: ckpt.restore(at, t), log,
                                    ckpt=ckpt, step=at)
        else:
            found = restore_into(base, run_dir, target, ckpt.restore_latest, log, ckpt=ckpt)
            if found is None:
                raise UsageError(f"--run-dir {run_dir}: no complete checkpoint to load.")
            step, state, _ = found
    finally:
        ckpt.close()
    return Finetuned(head.cfg, head.vocab, tokenizer, task, state["params"], step,
                     jax.jit(head.make_predict(graphdef)), head.name)


def _read_input(run: Finetuned, path: str | os.PathLike, *, with_labels: bool, log):
    try:
        examples = read_split(run.cfg, path, with_labels=with_labels)
        encoded = encode_split(run.cfg, examples, run.tokenizer,
                               run.vocab if with_labels else None)
    except DataError as e:
        raise UsageError(str(e)) from None
    note = _truncation_note(path, encoded, run.cfg.data.seq_len)
    if note:
        log(note)
    return examples, encoded


def _predict_all(run: Finetuned, encoded) -> np.ndarray:
    keys = BATCH_KEYS[run.cfg.finetune.task]
    arrays = {k: encoded.arrays[k] for k in keys if k in encoded.arrays}
    if "labels" not in arrays:  # unlabelled input: the loss is not used
        n = len(encoded)
        shape = (n,) if run.cfg.finetune.task == "classify" else (n, run.cfg.data.seq_len)
        arrays["labels"] = np.zeros(shape, np.int32)
    it = datalib.make_batch_iterator(arrays, batch_size=run.cfg.training.batch_size,
                                     shuffle=False, num_epochs=1, drop_remainder=False,
                                     tokenizer=run.tokenizer)
    pred, _ = run_predictions(run.predict, run.params, list(it), len(encoded))
    return pred


def evaluate_run(run_dir: str | os.PathLike, data: str | os.PathLike, *,
                 out: Optional[str | os.PathLike] = None, step: Optional[int] = None,
                 log: Callable[[str], None] = print,
                 task_name: Optional[str] = None) -> tuple[dict, str]:
    """Scores a fine-tuned run on a labelled file; writes the report (default
    ``RUN_DIR/report.json``, for task ``NAME`` of a multi-task run ``report_NAME.json``,
    plus ``<report>_confusion.png`` for classification).

    A multi-task run is scored on one task (``task_name``, ``--task NAME``; needed when it
    has several labelled tasks): that task's kind, labels and metric, as a single-task run
    of it.

    Returns:
      ``(report, table)``: the report dict as written and the printed table.

    Raises:
      UsageError: a bad run directory, data file or task name (one line).
    """
    run = load_finetuned(run_dir, step=step, log=log, task_name=task_name, multitask=True)
    examples, encoded = _read_input(run, data, with_labels=True, log=log)
    if run.cfg.finetune.task == "tag" and examples.tags is None:
        raise UsageError(f"{data}: no tags to score against.")
    pred = _predict_all(run, encoded)
    scores, _ = score(run.cfg, examples, encoded, pred, run.vocab)
    default = "report.json" if run.task_name is None else f"report_{run.task_name}.json"
    out_path = Path(out) if out is not None else Path(run_dir) / default
    png = out_path.with_name(out_path.stem + "_confusion.png")
    named = {} if run.task_name is None else {"task_name": run.task_name}
    report = write_report(run.cfg, scores, out_path, confusion=png,
                          extra={**named, "run_dir": str(run_dir), "data": str(data),
                                 "step": run.step, "truncated": int(encoded.truncated),
                                 "report": str(out_path)},
                          title=f"{Path(data).name} (step {run.step})")
    return report, format_report(run.cfg.finetune.task, scores)


def _write_atomic(path: str | os.PathLike, text: str) -> None:
    """``paths.write_text_atomic`` after checking ``path`` is a file in an existing directory."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; pass a file path to write.")
    if not path.parent.is_dir():
        raise UsageError(f"{path.parent}: no such directory; create it first or pick another "
                         "output path.")
    paths.write_text_atomic(path, text)


def _classification_output(examples, predicted: list[str]) -> str:
    if examples.format == "jsonl":
        return "".join(json.dumps({**row, "prediction": p}, ensure_ascii=False) + "\n"
                       for row, p in zip(examples.rows, predicted))
    buf = io.StringIO()
    if examples.format == "tsv":
        lines = (["\t".join([*examples.header, "prediction"])] if examples.header else [])
        lines += ["\t".join([*row, p]) for row, p in zip(examples.rows, predicted)]
        return "".join(line + "\n" for line in lines)
    writer = csv.writer(buf, lineterminator="\n")
    if examples.header:
        writer.writerow([*examples.header, "prediction"])
    for row, p in zip(examples.rows, predicted):
        writer.writerow([*row, p])
    return buf.getvalue()


def _conll_output(path, examples, tags: list[list[str]]) -> str:
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    at = {line: tag for numbers, sentence in zip(examples.lines, tags)
          for line, tag in zip(numbers, sentence)}
    first = lines[min(at) - 1]
    sep = "\t" if "\t" in first else " "
    return "".join((f"{raw.rstrip()}{sep}{at[i]}" if i in at else raw) + "\n"
                   for i, raw in enumerate(lines, 1))


def predict_run(run_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
                step: Optional[int] = None, log: Callable[[str], None] = print,
                task_name: Optional[str] = None) -> int:
    """Writes a fine-tuned run's predictions for ``data`` to ``out``: every input line with its
    columns unchanged and the prediction appended (a ``prediction`` column / key for
    TSV/CSV/JSONL, a tag column for CoNLL token lines; blank and ``-DOCSTART-`` lines kept).
    Nothing is written unless all of it is. A multi-task run predicts with the head of
    ``task_name`` (as ``evaluate_run``). Returns the number of examples.

    Raises:
      UsageError: a bad run directory, input or output path, or task name (one line).
    """
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; pass a file path.")
    run = load_finetuned(run_dir, step=step, log=log, task_name=task_name, multitask=True)
    examples, encoded = _read_input(run, data, with_labels=False, log=log)
    pred = _predict_all(run, encoded)
    if run.cfg.finetune.task == "classify":
        text = _classification_output(examples, run.vocab.decode(pred))
    else:
        tags = datalib.tags_from_subwords(pred, encoded.arrays["word_index"], encoded.n_words,
                                          run.vocab)
        text = _conll_output(data, examples, tags)
    _write_atomic(out, text)
    return len(encoded)


__all__ = ["TRUNK", "FineTuner", "LabelledData", "finetune", "format_finetune_summary",
           "check_pretrained", "restore_trunk", "with_trunk", "finetune_optimizer",
           "Finetuned", "Head", "read_labels", "load_finetuned", "evaluate_run", "predict_run",
           "resolve_splits", "is_tfds", "read_tfds_splits", "read_split",
           "make_vocab", "encode_split", "make_task", "score"]
