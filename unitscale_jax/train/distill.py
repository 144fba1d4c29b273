"""``--distill-from RUN``: the teacher of a distillation run (``tasks.Distillation``).

The teacher is a finished run of the same kind as the student: a ``train --model decoder``
run for a decoder language model, a ``finetune --task classify`` run (the same labels) for a
sentence classifier. It may differ in width and depth but must share the tokenizer (the
distributions compared are over one vocabulary) and have seen rows at least as long. Its
parameters come from its newest valid checkpoint (a fine-tuning run's: the best by the dev
score); its model is built in the *student's* ``--precision``, so its logits are computed in
the student's precision policy inside the jitted train step. The teacher is loaded again at
every start and resumption (it is not part of the student's checkpoints).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from flax import nnx

from unitscale_jax.train import build
from unitscale_jax.train.config import Config, resolve
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.finetune import load_finetuned, tokenizer_identity
from unitscale_jax.train.run_dir import read_run_config
from unitscale_jax.train.sample import restore_params
from unitscale_jax.train.tasks import LanguageModelling, SequenceClassification, Task

FLAG = "--distill-from"


@dataclasses.dataclass
class Teacher:
    """A loaded teacher.

    Attributes:
      source: its run directory.
      cfg: its resolved config (``--precision`` the student's).
      graphdef: its model's graph, eval mode.
      abstract_params: its ``nnx.Param`` state, abstract (for the shardings).
      params: its parameters (pure dict of arrays).
      step: the checkpoint's step.
    """

    source: str
    cfg: Config
    graphdef: Any
    abstract_params: Any
    params: Any
    step: int


def _describe(cfg: Config) -> str:
    if cfg.finetune is not None:
        return f"a 'finetune --task {cfg.finetune.task}' run"
    return f"a 'train --model {cfg.model.kind}' run"


def _check_kind(cfg: Config, teacher: Config, base: Task, source: str) -> None:
    if isinstance(base, LanguageModelling):
        want = "a 'train --model decoder' run"
        ok = teacher.finetune is None and teacher.model.kind == "decoder"
    elif isinstance(base, SequenceClassification):
        want = "a 'finetune --task classify' run"
        ok = teacher.finetune is not None and teacher.finetune.task == "classify"
    else:
        what = (f"finetune --task {cfg.finetune.task}" if cfg.finetune is not None else
                f"train --model {cfg.model.kind}")
        raise UsageError(f"{FLAG}: distillation trains decoder language models (train --model "
                         f"decoder) and sentence classifiers (finetune --task classify), not "
                         f"'{what}'; leave {FLAG} out.")
    if not ok:
        raise UsageError(f"{FLAG} {source} is {_describe(teacher)}; this student needs {want} "
                         "as its teacher (the same kind of predictions).")


def _check_compatible(cfg: Config, teacher: Config, source: str) -> None:
    if tokenizer_identity(teacher.data.tokenizer) != tokenizer_identity(cfg.data.tokenizer):
        raise UsageError(f"{FLAG} {source}: the teacher's tokenizer is "
                         f"{teacher.data.tokenizer!r}, this run's {cfg.data.tokenizer!r}; "
                         "distillation compares predictions over one vocabulary: pass "
                         f"--tokenizer {teacher.data.tokenizer} or a teacher trained with "
                         f"{cfg.data.tokenizer!r}.")
    if teacher.data.seq_len < cfg.data.seq_len:
        raise UsageError(f"{FLAG} {source}: the teacher was trained on rows of "
                         f"{teacher.data.seq_len} tokens, shorter than this run's --seq-len "
                         f"{cfg.data.seq_len}; use --seq-len {teacher.data.seq_len} or less.")


def load_teacher(cfg: Config, data: Any, base: Task, *,
                 log: Callable[[str], None] = print) -> Teacher:
    """The teacher of ``cfg.training.distill_from`` for a student learning ``base``.

    Args:
      cfg: the student's resolved config.
      data: the student's data (``vocab_size``; a classifier's ``vocab``, its labels).
      base: the student's task.
      log: where the loading message goes.

    Raises:
      UsageError: no such run, not a run, a teacher of another kind, another tokenizer (or
        label set, or vocabulary), shorter rows, or no valid checkpoint.
    """
    source = cfg.training.distill_from
    given = read_run_config(source, FLAG)
    _check_kind(cfg, given, base, source)
    tcfg = resolve(given).replace(training={"precision": cfg.training.precision})
    _check_compatible(cfg, tcfg, source)
    if tcfg.finetune is None:
        tokenizer, abstract_model, params, step = restore_params(source, tcfg, log=log,
                                                                 flag=FLAG)
        vocab_size = tokenizer.vocab_size
    else:
        run = load_finetuned(source, log=log)
        if run.vocab.labels != data.vocab.labels:
            raise UsageError(f"{FLAG} {source}: the teacher's labels "
                             f"{list(run.vocab.labels)} differ from this run's "
                             f"{list(data.vocab.labels)}; distil from a classifier of the same "
                             "labels.")
        vocab_size, params, step = run.tokenizer.vocab_size, run.params, run.step
        abstract_model = nnx.eval_shape(lambda: build.build_model(tcfg, vocab_size,
                                                                  task=run.task))
    if vocab_size != data.vocab_size:
        raise UsageError(f"{FLAG} {source}: the teacher's vocabulary has {vocab_size} tokens, "
                         f"this run's {data.vocab_size}; use the teacher's tokenizer.")
    abstract_model.eval()
    graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    m = tcfg.model
    log(f"distilling from {source} (step {step}: {m.parametrization}, d_model {m.d_model}, "
        f"{m.n_layers} layers), T {cfg.training.distill_temperature:g}, weight "
        f"{cfg.training.distill_weight:g}")
    return Teacher(str(source), tcfg, graphdef, abstract_params, params, step)
