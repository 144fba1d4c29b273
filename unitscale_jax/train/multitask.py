"""Multi-task fine-tuning: one encoder trunk, a head per task, a dataset per task.

- ``parse_task_spec`` reads ``--task NAME=KIND:PATH`` (``KIND`` ``classify`` or ``tag``,
  ``PATH`` a split directory), ``parse_task_weights`` ``--task-weight NAME=W`` and
  ``parse_sampling`` ``--task-sampling proportional|temperature:T``;
- ``sampling_probabilities``: the share of a step's rows each task gets, proportional to its
  training-set size ``n_i`` or to ``n_i^(1/T)`` (temperature ``T``: 1 is proportional, large
  T uniform); a task of weight 0 gets none;
- ``MultiTaskBatches``: every step, the ``batch_size`` rows are allocated to the tasks by a
  multinomial draw with those probabilities; each task's batch (from its own iterator) keeps
  that many rows valid (``valid``), the rest are not scored;
- ``MultiTask``: the loss ``sum_i w_i L_i`` of the tasks' own losses (``SequenceClassification``
  / ``TokenClassification`` on ``MultiTaskEncoder.view``), each head a readout of its task
  only, the trunk's gradient scaled by the add rule ``nn.trunk_grad_scale(weights)`` so it
  keeps the single-task scale whatever the number of tasks. With every other weight 0 a task
  trains exactly as it does alone;
- ``run_head``: one task's head of a finished run, which ``evaluate`` / ``predict --task
  NAME`` score as a single-task run of that task.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitscale_jax import nn
from unitscale_jax.train import finetune as ft
from unitscale_jax.train import step as steplib
from unitscale_jax.train.checkpoint import Checkpoints
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.metrics import read_metrics
from unitscale_jax.train.scores import TASK_METRICS
from unitscale_jax.train.tasks import (
    MaskedLanguageModelling,
    SequenceClassification,
    Task,
    TokenClassification,
)
from unitscale_jax.train.trainer import Trainer

KINDS = ("classify", "tag", "mlm")
"""The kinds of task a ``--task NAME=KIND:PATH`` spec names (``mlm``: masked-LM on a text
corpus, an auxiliary task)."""

SPEC_FORM = ("NAME=KIND:PATH (KIND classify, tag or mlm, e.g. --task sst2=classify:data/sst2 "
             "or --task aux=mlm:corpus.txt)")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One task of a multi-task run: its name, kind and split directory."""

    name: str
    kind: str
    path: Path


def is_multitask_spec(value: str) -> bool:
    """Whether a ``--task`` value is meant as the multi-task ``NAME=KIND:PATH`` form (it has
    ``=`` or ``:``; the single-task values ``classify`` / ``tag`` have neither)."""
    return "=" in value or ":" in value


def multitask_argv(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--task NAME=KIND:PATH`` written as the config flag ``--tasks``
    (``FinetuneConfig.tasks``); the single-task ``--task classify|tag`` is left as it is.

    Raises:
      UsageError: both forms given.
    """
    out: list[str] = []
    single, multi = [], False
    i = 0
    while i < len(argv):
        a = argv[i]
        value = (argv[i + 1] if a == "--task" and i + 1 < len(argv) else
                 a[len("--task="):] if a.startswith("--task=") else None)
        step = 2 if a == "--task" else 1
        if value is not None and is_multitask_spec(value):
            out += ["--tasks", value]
            multi = True
            i += step
            continue
        if value is not None:
            single.append(value)
        out.append(a)
        i += 1
    if multi and single:
        raise UsageError(f"--task {single[0]} and --task NAME=KIND:PATH mix the single- and the "
                         "multi-task forms; give every task as NAME=KIND:PATH.")
    return out


def parse_task_spec(value: str) -> TaskSpec:
    """``NAME=KIND:PATH`` -> ``TaskSpec``.

    Raises:
      UsageError: anything that does not parse (one line saying what and the form wanted).
    """
    name, eq, rest = value.partition("=")
    kind, colon, path = rest.partition(":")
    if not eq or not colon:
        raise UsageError(f"--task {value!r} does not parse; write {SPEC_FORM}.")
    if not name.isidentifier():
        raise UsageError(f"--task {value!r}: the name {name!r} must be a word (letters, digits, "
                         f"_); write {SPEC_FORM}.")
    if kind not in KINDS:
        raise UsageError(f"--task {value!r}: kind {kind!r} is not one of {', '.join(KINDS)}; "
                         f"write {SPEC_FORM}.")
    if not path:
        raise UsageError(f"--task {value!r}: no PATH after {kind}:; write {SPEC_FORM}.")
    return TaskSpec(name, kind, Path(path))


def parse_task_specs(values: Sequence[str]) -> list[TaskSpec]:
    """Every ``--task NAME=KIND:PATH`` of a run (at least one; distinct names)."""
    specs = [parse_task_spec(v) for v in values]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UsageError(f"--task: the name(s) {', '.join(dup)} appear more than once; give "
                         "each task its own name.")
    if not specs:
        raise UsageError(f"no --task given; write {SPEC_FORM}.")
    return specs


def parse_task_weights(values: Sequence[str], names: Sequence[str]) -> dict[str, float]:
    """``--task-weight NAME=W`` values -> ``{name: weight}`` (1 for every task not given).

    Raises:
      UsageError: a value that does not parse, an unknown name, a negative or non-finite
        weight, or every weight 0.
    """
    weights = {n: 1.0 for n in names}
    for v in values:
        name, eq, w = v.partition("=")
        try:
            weight = float(w)
        except ValueError:
            weight = None
        if not eq or weight is None:
            raise UsageError(f"--task-weight {v!r} does not parse; write NAME=WEIGHT, e.g. "
                             f"--task-weight {names[0]}=0.5.")
        if name not in weights:
            raise UsageError(f"--task-weight {v!r}: no task {name!r} (the tasks are "
                             f"{', '.join(names)}).")
        if not math.isfinite(weight) or weight < 0:
            raise UsageError(f"--task-weight {v!r}: the weight must be a finite number >= 0.")
        weights[name] = weight
    if not any(w > 0 for w in weights.values()):
        raise UsageError("--task-weight: every task has weight 0; give one a positive weight.")
    return weights


def parse_sampling(value: str) -> float:
    """``proportional`` -> temperature 1.0; ``temperature:T`` -> ``T`` (> 0).

    Raises:
      UsageError: anything else.
    """
    if value == "proportional":
        return 1.0
    kind, _, t = value.partition(":")
    try:
        temperature = float(t) if kind == "temperature" else None
    except ValueError:
        temperature = None
    if temperature is None or not math.isfinite(temperature) or temperature <= 0:
        raise UsageError(f"--task-sampling {value!r} does not parse; write proportional or "
                         "temperature:T with T > 0 (e.g. temperature:2).")
    return temperature


def sampling_probabilities(sizes: Mapping[str, int], temperature: float = 1.0,
                           weights: Optional[Mapping[str, float]] = None) -> dict[str, float]:
    """The share of each step's rows a task gets: ``p_i`` proportional to ``n_i^(1/T)`` over
    the tasks of positive weight (0 for the others).

    Args:
      sizes: ``{name: training examples}``.
      temperature: ``T > 0`` (1: proportional to size; large: uniform).
      weights: ``{name: loss weight}`` (default all 1).
    """
    if not temperature > 0:
        raise ValueError(f"sampling_probabilities: temperature must be > 0, got {temperature}.")
    mass = {n: (float(s) ** (1.0 / temperature)
                if (weights is None or weights.get(n, 1.0) > 0) else 0.0)
            for n, s in sizes.items()}
    total = sum(mass.values())
    if total <= 0:
        raise ValueError(f"sampling_probabilities: no task to sample from ({dict(sizes)}, "
                         f"weights {weights}).")
    return {n: m / total for n, m in mass.items()}


def allocate_rows(rng: np.random.Generator, batch_size: int,
                  probabilities: Mapping[str, float]) -> dict[str, int]:
    """The rows of one step per task: a multinomial draw of ``batch_size`` rows."""
    names = list(probabilities)
    counts = rng.multinomial(batch_size, [probabilities[n] for n in names])
    return {n: int(c) for n, c in zip(names, counts)}


def keep_rows(batch: dict, count: int) -> dict:
    """``batch`` with only its first ``count`` rows valid (``valid`` False for the rest); an
    MLM batch (``valid`` per token: the attention mask) keeps its ``valid`` and scores no
    position of the other rows (``where``)."""
    n = len(next(iter(batch.values())))
    keep = np.arange(n) < count
    if "valid" in batch and np.ndim(batch["valid"]) == 2:
        return {**batch, "where": np.asarray(batch["where"], bool) & keep[:, None]}
    valid = np.asarray(batch["valid"], bool) & keep if "valid" in batch else keep
    return {**batch, "valid": valid}


class MultiTaskBatches:
    """Training batches of a multi-task run: each step a ``{name: batch}`` dict, one batch
    from every task's own iterator with its ``allocate_rows`` share of the rows valid.

    The allocation of step ``k`` is drawn from ``numpy.random.default_rng([seed, k])``, so
    ``get_state`` / ``set_state`` (the step and every task iterator's state) resume it.
    """

    def __init__(self, iterators: Mapping[str, Iterator[dict]], probabilities: Mapping[str, float],
                 batch_size: int, seed: int = 0):
        self.iterators, self.probabilities = dict(iterators), dict(probabilities)
        self.batch_size, self.seed, self.step = int(batch_size), int(seed), 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, dict]:
        counts = allocate_rows(np.random.default_rng([self.seed, self.step]), self.batch_size,
                               self.probabilities)
        self.step += 1
        return {n: keep_rows(next(it), counts[n]) for n, it in self.iterators.items()}

    def get_state(self) -> dict:
        return {"step": self.step,
                "tasks": {n: it.get_state() for n, it in self.iterators.items()}}

    def set_state(self, state: dict) -> None:
        self.step = int(state["step"])
        for n, it in self.iterators.items():
            it.set_state(state["tasks"][n])


def make_single_task(kind: str, n_out: int, pooling: str = "mean") -> Task:
    """The single-task ``Task`` of one head (its loss, predictions and metrics)."""
    if kind == "classify":
        return SequenceClassification(n_out, pooling)
    if kind == "mlm":
        return MaskedLanguageModelling()
    return TokenClassification(n_out)


class MultiTask(Task):
    """Several labelled tasks on one ``MultiTaskEncoder``.

    A batch is ``{name: that task's batch}``; the loss is ``sum_i w_i L_i`` with ``L_i`` task
    ``i``'s own loss (its ``Task.loss`` on ``model.view(name, s)``), ``s =
    nn.trunk_grad_scale(weights)`` the add rule on the trunk's gradient. Tasks of weight 0
    are not computed in training (their heads get no gradient). ``eval_sums`` carries
    ``<name>_loss`` of every task present in the batch.

    Args:
      heads: ``{name: (kind, n_out)}`` (``MultiTaskEncoder``'s heads).
      weights: ``{name: w >= 0}`` (default all 1).
      pooling: the classification heads' pooling.
      scale_trunk: apply the add rule to the trunk's gradient (False: the plain sum, for
        comparison).
    """

    objective, model_class = "multitask", nn.MultiTaskEncoder

    def __init__(self, heads: Mapping[str, tuple[str, int]],
                 weights: Optional[Mapping[str, float]] = None, *, pooling: str = "mean",
                 scale_trunk: bool = True):
        self.heads, self.pooling = dict(heads), pooling
        self.weights = {n: float((weights or {}).get(n, 1.0)) for n in self.heads}
        self.tasks = {n: make_single_task(k, c, pooling) for n, (k, c) in self.heads.items()}
        self.trunk_scale = nn.trunk_grad_scale(list(self.weights.values())) if scale_trunk else 1.0

    def make_model(self, config, rngs):
        return self.model_class(config, rngs=rngs, heads=self.heads, pooling=self.pooling)

    def task_loss(self, model: Any, name: str, batch: dict, rng: Optional[jax.Array]
                  ) -> tuple[jax.Array, jax.Array]:
        """``(loss, count)`` of task ``name`` on its batch (gradient to the trunk scaled)."""
        return self.tasks[name].loss(model.view(name, self.trunk_scale), batch, rng)

    def loss(self, model, batch, rng):
        total, count = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)
        for i, name in enumerate(self.heads):
            w = self.weights[name]
            if w == 0 or name not in batch:
                continue
            key = None if rng is None else jax.random.fold_in(rng, i)
            loss, n = self.task_loss(model, name, batch[name], key)
            total, count = total + w * loss.astype(jnp.float32), count + n.astype(jnp.int32)
        return total, count

    def eval_sums(self, model, batch):
        sums = {}
        for name in self.heads:
            if name in batch:
                loss, n = self.task_loss(model, name, batch[name], None)
                sums[f"{name}_loss"] = (loss * n, n)
        return sums

    def predict(self, model, batch: dict, name: str) -> jax.Array:
        """Task ``name``'s predictions (eval mode): class ids ``[batch]`` or tag ids
        ``[batch, seq]``."""
        return self.tasks[name].predict(model.view(name), batch)

    def metrics(self, means, bytes_per_token):
        return dict(means)




# --------------------------------------------------------------------------- the run

SCORE = "score"
"""The validation score of a multi-task run (the mean of the tasks' own metrics, accuracy or
entity F1): what picks its best checkpoint."""


def check_multitask_config(cfg: Any) -> tuple[list[TaskSpec], dict[str, float], float]:
    """The tasks, their loss weights and the sampling temperature of a multi-task config.

    Raises:
      UsageError: a spec, weight or sampling that does not parse, or options that name one
        task's files (``--data``, ``--train``, ``--dev``, ``--test``) or ``--distill-from``.
    """
    f = cfg.finetune
    specs = parse_task_specs(f.tasks or [])
    given = [flag for flag, v in (("--data", cfg.data.data), ("--train", f.train),
                                  ("--dev", f.dev), ("--test", f.test)) if v is not None]
    if given:
        raise UsageError(f"{' / '.join(given)}: with --task NAME=KIND:PATH each task's PATH is "
                         "its split directory (train.* / dev.* / test.*); drop "
                         f"{' / '.join(given)}.")
    if cfg.training.distill_from:
        raise UsageError("--distill-from is not supported with several --task NAME=KIND:PATH; "
                         "distil a single-task run.")
    if all(s.kind == "mlm" for s in specs):
        raise UsageError("--task NAME=mlm:PATH is an auxiliary task; add a labelled one "
                         "(--task NAME=classify:DIR or NAME=tag:DIR), or pretrain with "
                         "'unitscale-jax train --model encoder'.")
    weights = parse_task_weights(f.task_weight or [], [s.name for s in specs])
    return specs, weights, parse_sampling(f.task_sampling)


def task_config(cfg: Any, spec: TaskSpec) -> Any:
    """The single-task config of one task of a multi-task run (its kind, its directory)."""
    kind = spec.kind if spec.kind != "mlm" else cfg.finetune.task
    return cfg.replace(finetune={"task": kind, "tasks": None, "task_weight": None},
                       data={"data": str(spec.path)})


class MultiTaskData:
    """The labelled splits of every task (``finetune.LabelledData`` each) with the interface
    of ``train.data.RunData``: ``train_iterator`` gives ``MultiTaskBatches``,
    ``eval_batches`` ``{name: batches}``.

    Raises:
      UsageError: bad task options or data (one line, naming the task's files).
    """

    bytes_per_token = float("nan")

    def __init__(self, cfg: Any, log=print):
        self.specs, self.weights, self.temperature = check_multitask_config(cfg)
        self.configs = {s.name: task_config(cfg, s) for s in self.specs}
        self.kinds = {s.name: s.kind for s in self.specs}
        if sum(k == "mlm" for k in self.kinds.values()) > 1:
            raise UsageError("--task NAME=mlm:PATH: one MLM task at most (it trains the "
                             "encoder's vocabulary readout).")
        self.tasks, sizes = {}, {}
        for s in self.specs:
            c, task_log = self.configs[s.name], (lambda m, n=s.name: log(f"{n}: {m}"))
            if s.kind == "mlm":
                self.tasks[s.name] = CorpusTask(c, task_log)
                sizes[s.name] = self.tasks[s.name].rows
            else:
                self.tasks[s.name] = ft.LabelledData(c, task_log)
                sizes[s.name] = len(self.tasks[s.name].splits["train"].encoded)
        self.tokenizer = next(iter(self.tasks.values())).tokenizer
        self.probabilities = sampling_probabilities(sizes, self.temperature, self.weights)
        log("tasks: " + "; ".join(
            f"{n} ({self.kinds[n]}, {sizes[n]} training examples, weight "
            f"{self.weights[n]:g}, {self.probabilities[n]:.3f} of the rows)" for n in sizes))

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def heads(self) -> dict[str, tuple[str, int]]:
        """``{name: (kind, labels)}`` of ``MultiTaskEncoder`` (the vocabulary for MLM)."""
        return {n: (self.kinds[n], self.vocab_size if self.kinds[n] == "mlm" else len(d.vocab))
                for n, d in self.tasks.items()}

    def train_iterator(self, cfg: Any, *, shard_index: int = 0, shard_count: int = 1):
        its = {n: d.train_iterator(self.configs[n], shard_index=shard_index,
                                   shard_count=shard_count) for n, d in self.tasks.items()}
        return MultiTaskBatches(its, self.probabilities, cfg.training.batch_size,
                                seed=cfg.training.seed)

    def eval_batches(self, cfg: Any, n: int = 0, split: str = "dev") -> dict[str, list[dict]]:
        return {name: d.eval_batches(self.configs[name], split=split)
                for name, d in self.tasks.items()
                if split in d.splits or (self.kinds[name] == "mlm" and split == "dev")}


class CorpusTask:
    """The text corpus of an MLM task (``train.data.load_data`` of its PATH, the run's
    tokenizer and ``--seq-len``): ``rows`` (training rows, for the sampling), the training
    iterator and the dev batches (``--eval-batches`` of its validation split)."""

    splits: dict = {}

    def __init__(self, cfg: Any, log=print):
        from unitscale_jax.data import corpus_stats
        from unitscale_jax.train.data import load_data
        self.data = load_data(cfg.replace(model={"kind": "encoder"}), log)
        self.tokenizer = self.data.tokenizer
        tokens = corpus_stats(self.data.source, self.tokenizer, ["train"])["train"].tokens
        self.rows = max(1, tokens // cfg.data.seq_len)

    def train_iterator(self, cfg: Any, *, shard_index: int = 0, shard_count: int = 1):
        return self.data.train_iterator(cfg, shard_index=shard_index, shard_count=shard_count)

    def eval_batches(self, cfg: Any, split: str = "dev") -> list[dict]:
        return self.data.eval_batches(cfg, cfg.training.eval_batches) if split == "dev" else []


def _task_eval_fn(graphdef, task: MultiTask, name: str):
    def eval_sums(params, batch):
        model = nnx.merge(graphdef, params)
        model.eval()
        return task.tasks[name].eval_sums(model.view(name), batch)

    return eval_sums


def _task_predict_fn(graphdef, task: MultiTask, name: str):
    def predict(params, batch):
        model = nnx.merge(graphdef, params)
        model.eval()
        return (task.tasks[name].eval_sums(model.view(name), batch),
                task.predict(model, batch, name))

    return predict


def run_head(run_dir: Path, cfg: Any, name: Optional[str], vocab_size: int) -> ft.Head:
    """The head of task ``name`` of a finished multi-task run, for ``evaluate`` / ``predict``
    (``finetune.load_finetuned``): the task's single-task config (``task_config``), its
    labels (``labels_<name>.json``), the run's ``MultiTask`` and the task's predictions;
    checkpoints ranked by the run's ``SCORE``.

    Args:
      run_dir: the run directory.
      cfg: its resolved config.
      name: the task (``--task NAME``); may be None when the run has one labelled task.
      vocab_size: the tokenizer's vocabulary (an MLM task's head).

    Raises:
      UsageError: no ``name`` with several labelled tasks, or a name that is not one of
        them (both list the tasks).
    """
    specs, weights, _ = check_multitask_config(cfg)
    labelled = {s.name: s for s in specs if s.kind != "mlm"}
    tasks = ", ".join(f"{n} ({s.kind})" for n, s in labelled.items())
    if name is None and len(labelled) > 1:
        raise UsageError(f"--run-dir {run_dir} is a multi-task run of the tasks {tasks}; pick "
                         "one with --task NAME.")
    if name is not None and name not in labelled:
        what = ("is the run's auxiliary mlm task, which has no labels to score" if
                any(s.name == name for s in specs) else "is not a task of the run")
        raise UsageError(f"--task {name} {what}; the tasks of --run-dir {run_dir} are "
                         f"{tasks}: pass one of them.")
    spec = labelled[name] if name is not None else next(iter(labelled.values()))
    vocabs = {n: ft.read_labels(run_dir, f"labels_{n}.json") for n in labelled}
    heads = {s.name: (s.kind, vocab_size if s.kind == "mlm" else len(vocabs[s.name]))
             for s in specs}
    task = MultiTask(heads, weights, pooling=cfg.finetune.pooling)
    return ft.Head(task_config(cfg, spec), vocabs[spec.name], task,
                   lambda graphdef: _task_predict_fn(graphdef, task, spec.name), SCORE,
                   spec.name)


class MultiTaskFineTuner(ft.FineTuner):
    """Fine-tunes one ``MultiTaskEncoder`` on every ``--task NAME=KIND:PATH`` (a
    ``FineTuner`` whose data is ``MultiTaskData`` and task ``MultiTask``). Each
    evaluation scores every task's dev split: the validation row carries
    ``<name>_loss`` and ``<name>_<score>`` per task, ``loss`` (the weighted sum) and
    ``score`` (the mean of the tasks' metrics, which ranks the checkpoints). The final
    reports are ``dev_report_<name>.json`` (and ``test_report_<name>.json``) per task.
    """

    def __init__(self, config, *, quiet=False, devices=None):
        super().__init__(config, quiet=quiet, devices=devices)
        self.metric = SCORE
        self._predicts = {
            n: jax.jit(_task_predict_fn(self.graphdef, self.task, n),
                       in_shardings=(self.shardings["params"], self.par.batch),
                       out_shardings=self.par.replicated)
            for n, (kind, _) in self.task.heads.items() if kind != "mlm"}
        self._evals = {n: jax.jit(_task_eval_fn(self.graphdef, self.task, n))
                       for n, (kind, _) in self.task.heads.items() if kind == "mlm"}

    def _load_data(self):
        data = MultiTaskData(self.cfg, self.log)
        if self.cfg.training.init_from:
            self.pretrained = ft.check_pretrained(self.cfg, self.cfg.training.init_from)
        return data

    def _make_task(self):
        f = self.cfg.finetune
        return MultiTask(self.data.heads(), self.data.weights, pooling=f.pooling)

    def _make_checkpoints(self):
        t = self.cfg.training
        return Checkpoints(self.run_dir / "checkpoints", keep=t.keep_checkpoints,
                           async_save=t.async_checkpointing, log=self.log,
                           best_metric=SCORE)

    def build_state(self) -> int:
        start = Trainer.build_state(self)
        if self.primary:
            for n, d in self.data.tasks.items():
                if self.data.kinds[n] == "mlm":
                    continue
                (self.run_dir / f"labels_{n}.json").write_text(d.vocab.to_json() + "\n")
        for row in read_metrics(self.metrics_path):
            if row["split"] == "validation" and self.metric in row:
                self._track(row)
        return start

    def step(self, batch):
        with self.par.context():
            self.state, metrics = self._train_step(
                self.state, {n: steplib.put_batch(b, self.par) for n, b in batch.items()})
        return metrics

    def _task_scores(self, name: str, split: str, params, batches):
        d, cfg = self.data.tasks[name], self.data.configs[name]
        s = d.splits[split]
        with self.par.context():
            pred, loss = ft.run_predictions(self._predicts[name], params, batches,
                                            len(s.encoded),
                                            put=lambda b: steplib.put_batch(b, self.par))
        scores, _ = ft.score(cfg, s.examples, s.encoded, pred, d.vocab)
        return scores, loss

    def _mlm_loss(self, name: str, params) -> float:
        total, count = 0.0, 0
        with self.par.context():
            for b in self.eval_batches[name]:
                s, c = self._evals[name](params, steplib.put_batch(b, self.par))["loss"]
                total, count = total + float(s), count + int(c)
        return total / max(count, 1)

    def evaluate(self, step: int) -> dict:
        """Scores every task's dev split (an MLM task: its loss); writes and returns the
        validation row."""
        values, total, metrics = {}, 0.0, []
        for n, kind in self.data.kinds.items():
            if kind == "mlm":
                values[f"{n}_loss"] = loss = self._mlm_loss(n, self.state["params"])
                total += self.data.weights[n] * loss
                continue
            scores, loss = self._task_scores(n, "dev", self.state["params"],
                                             self.eval_batches[n])
            values[f"{n}_loss"] = loss
            values.update({f"{n}_{k}": v for k, v in ft.row_values(kind, scores).items()})
            total += self.data.weights[n] * loss
            metrics.append(scores[TASK_METRICS[kind]])
        row = self.writer.write(step, "validation", {"loss": total, **values,
                                                     SCORE: float(np.mean(metrics))})
        self.history.append(row)
        self.last["validation"] = row
        self._track(row)
        parts = ", ".join(f"{k} {v:.4f}" for k, v in row.items()
                          if k not in ("step", "split"))
        self.log(f"step {step}: dev {parts}")
        return row

    def _final_reports(self, summary: dict) -> dict:
        params, best = self._best_params()
        out: dict[str, Any] = {"best_step": best, "best_dev": {}, "test": {}}
        for n, kind in self.data.kinds.items():
            d = self.data.tasks[n]
            if kind == "mlm":
                out["best_dev"][f"{n}_loss"] = self._mlm_loss(n, params)
                continue
            for name in ("dev", "test"):
                if name not in d.splits or not self.primary:
                    continue
                batches = (self.eval_batches[n] if name == "dev" else
                           d.eval_batches(self.data.configs[n], split=name))
                scores, loss = self._task_scores(n, name, params, batches)
                path = self.run_dir / f"{name}_report_{n}.json"
                png = self.run_dir / f"{'' if name == 'dev' else 'test_'}confusion_{n}.png"
                ft.write_report(self.data.configs[n], scores, path,
                                extra={"task_name": n, "split": name,
                                       "data": str(d.splits[name].path), "step": best,
                                       "loss": loss},
                                confusion=png if self.cfg.training.plot else None,
                                title=f"{n} {name} (step {best})")
                out[f"{name}_report_{n}"] = str(path)
                key = "best_dev" if name == "dev" else "test"
                out[key].update({f"{n}_{k}": v for k, v in
                                 ft.row_values(kind, scores).items()})
        tps = summary.get("tokens_per_s")
        out["examples_per_s"] = tps / self.cfg.data.seq_len if tps else None
        out["stop_reason"] = self.stop_reason
        summary.update(out)
        if self.primary:
            path = self.run_dir / "summary.json"
            saved = json.loads(path.read_text())
            path.write_text(json.dumps({**saved, **out}, indent=2) + "\n")
        return summary



def multitask_finetune(config: Any, *, quiet: bool = False,
                       devices: Optional[Sequence[Any]] = None) -> dict[str, Any]:
    """Fine-tunes (or resumes) the multi-task run of ``config``; returns ``FineTuner.run``'s
    summary with per-task ``best_dev`` / ``test`` scores (``<name>_<score>``)."""
    return MultiTaskFineTuner(config, quiet=quiet, devices=devices).run()


__all__ = ["KINDS", "TaskSpec", "is_multitask_spec", "parse_task_spec", "parse_task_specs",
           "parse_task_weights", "parse_sampling", "sampling_probabilities", "allocate_rows",
           "keep_rows", "MultiTaskBatches", "make_single_task", "MultiTask", "multitask_argv",
           "check_multitask_config", "task_config", "MultiTaskData", "CorpusTask", "SCORE",
           "run_head", "MultiTaskFineTuner", "multitask_finetune"]
