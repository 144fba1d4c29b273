"""Training tasks: what a model kind learns from its batches.

A ``Task`` names the data objective (``unitscale_jax.data.make_iterator(task=...)``), the
model class and the loss of one batch (the model's own loss method), and turns validation
sums into the metrics of a validation row. ``TASKS`` maps ``--model`` to its task::

    class Tagging(Task):                        # a new task is one small class
        objective, model_class = "tagging", nn.TransformerEncoder

        def loss(self, model, batch, rng):
            loss = model.token_classification_loss(batch["ids"], batch["tags"], batch["where"],
                                                  rng=rng)
            return loss, jnp.sum(batch["where"])
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax import nn
from unitscale_jax.train.errors import UsageError


class Task:
    """A model kind's objective, model class, loss and validation metrics.

    Attributes:
      objective: the data pipeline's task name (``lm``, ``mlm``, ``seq2seq``, ...).
      model_class: the ``unitscale_jax.nn`` model trained (built from a ``TransformerConfig``).
    """

    objective: ClassVar[str]
    model_class: ClassVar[type]

    def loss(self, model: Any, batch: dict, rng: Optional[jax.Array]
             ) -> tuple[jax.Array, jax.Array]:
        """``(mean loss over the scored items, number scored)`` of one batch."""
        raise NotImplementedError

    def make_model(self, config: Any, rngs: Any) -> Any:
        """The model trained, from a ``TransformerConfig`` (task heads included)."""
        return self.model_class(config, rngs=rngs)

    def max_seq_len(self, seq_len: int, data_config: Any) -> int:
        """The model's ``max_seq_len`` for rows of ``seq_len`` tokens (``--seq-len``)."""
        return seq_len

    def eval_sums(self, model: Any, batch: dict) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Validation ``{name: (sum over the batch, count)}`` (in eval mode, no dropout)."""
        loss, count = self.loss(model, batch, None)
        return {"loss": (loss * count, count)}

    def metrics(self, means: dict[str, float], bytes_per_token: float) -> dict[str, float]:
        """A validation row from the means of ``eval_sums``: the loss in nats per scored
        token and the same in bits per byte of text."""
        return {**means, "bits_per_byte": means["loss"] / math.log(2) / bytes_per_token}

    def outputs(self, model: Any, batch: dict, rng: Optional[jax.Array]
                ) -> tuple[jax.Array, jax.Array, Optional[jax.Array]]:
        """``(logits [..., V], labels [...], where [...] or None)`` of the scored items of a
        batch: what ``loss`` computes its cross-entropy from (a distillation teacher's and
        student's predictions, ``Distillation``)."""
        raise UsageError(f"{type(self).__name__} does not support distillation (--distill-from "
                         "needs a decoder language model or a sentence classifier).")

    def bind(self, teacher: Any) -> "Task":
        """This task with the frozen parameters of the train state's ``teacher`` entry (inside
        the jitted step; only ``Distillation`` uses them)."""
        del teacher
        return self


class LanguageModelling(Task):
    """Next-token prediction with a causal decoder (``TransformerDecoder.loss``)."""

    objective, model_class = "lm", nn.TransformerDecoder

    def loss(self, model, batch, rng):
        loss = model.loss(batch["inputs"], batch["where"], targets=batch["targets"], rng=rng)
        return loss, jnp.sum(batch["where"])

    def outputs(self, model, batch, rng):
        return model(batch["inputs"], rng=rng), batch["targets"], batch["where"]


class MaskedLanguageModelling(Task):
    """Masked-token prediction with an encoder (``TransformerEncoder.mlm_loss``)."""

    objective, model_class = "mlm", nn.TransformerEncoder

    def loss(self, model, batch, rng):
        loss = model.mlm_loss(batch["ids"], batch["labels"], batch["where"], mask=batch["valid"],
                              rng=rng)
        return loss, jnp.sum(batch["where"])


class SpanCorruption(Task):
    """Corrupted spans predicted by an encoder-decoder (``TransformerEncoderDecoder.loss``)."""

    objective, model_class = "seq2seq", nn.TransformerEncoderDecoder

    def loss(self, model, batch, rng):
        where = batch["decoder_where"]
        loss = model.loss(batch["encoder_ids"], batch["decoder_input_ids"], where,
                          targets=batch["decoder_target_ids"], src_mask=batch["encoder_mask"],
                          rng=rng)
        return loss, jnp.sum(where)

    def max_seq_len(self, seq_len, data_config):
        from unitscale_jax.data import seq2seq_target_len
        return max(seq_len, seq2seq_target_len(seq_len, data_config.noise_density,
                                               data_config.mean_span))


class ModelLoss(Task):
    """``model.loss(batch["ids"])`` of any model with that method (next-token loss of every
    id), on batches made outside the data pipeline: the coordinate check, the benchmarks."""

    def loss(self, model, batch, rng):
        ids = batch["ids"]
        return model.loss(ids), jnp.asarray(ids[:, 1:].size)


class SequenceClassification(Task):
    """Sentence (pair) classification with an encoder and a fresh ``cls_head``
    (``TransformerEncoder.classification_loss``); the padding rows of a partial batch
    (``valid`` False) are not scored.

    Args:
      n_classes: the classes (the training split's label vocabulary).
      pooling: ``cls`` or ``mean`` (``TransformerEncoder.pool``).
    """

    objective, model_class = "classify", nn.TransformerEncoder

    def __init__(self, n_classes: int, pooling: str = "mean"):
        self.n_classes, self.pooling = n_classes, pooling

    def make_model(self, config, rngs):
        return self.model_class(config, rngs=rngs, n_classes=self.n_classes, mlm_head=False,
                                pooling=self.pooling)

    def loss(self, model, batch, rng):
        where = batch.get("valid")
        loss = model.classification_loss(batch["ids"], batch["labels"], where,
                                         mask=batch["mask"], rng=rng)
        return loss, (jnp.sum(where) if where is not None else jnp.asarray(batch["ids"].shape[0]))

    def outputs(self, model, batch, rng):
        return (model.classify(batch["ids"], mask=batch["mask"], rng=rng), batch["labels"],
                batch.get("valid"))

    def predict(self, model, batch) -> jax.Array:
        """Predicted class ids ``[batch]`` (eval mode)."""
        return jnp.argmax(model.classify(batch["ids"], mask=batch["mask"]), axis=-1)

    def metrics(self, means, bytes_per_token):
        return dict(means)


class TokenClassification(Task):
    """Token classification (NER) with an encoder and a fresh ``token_head``
    (``TransformerEncoder.token_classification_loss``): each word's tag sits on its first
    subword (``where``); the other positions and padding rows are not scored.

    Args:
      n_tags: the tags (``LabelVocab.for_tags`` of the training split).
    """

    objective, model_class = "tag", nn.TransformerEncoder

    def __init__(self, n_tags: int):
        self.n_tags = n_tags

    def make_model(self, config, rngs):
        return self.model_class(config, rngs=rngs, n_token_classes=self.n_tags, mlm_head=False)

    def loss(self, model, batch, rng):
        where = batch["where"]
        if "valid" in batch:
            where = where & batch["valid"][:, None]
        loss = model.token_classification_loss(batch["ids"], batch["labels"], where,
                                               mask=batch["mask"], rng=rng)
        return loss, jnp.sum(where)

    def predict(self, model, batch) -> jax.Array:
        """Predicted tag ids ``[batch, seq]`` (eval mode)."""
        return jnp.argmax(model.tag(batch["ids"], mask=batch["mask"]), axis=-1)

    def metrics(self, means, bytes_per_token):
        return dict(means)


class Distillation(Task):
    """A base task learnt from a teacher as well (Hinton et al., 2015): the loss is
    ``weight * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - weight) * CE(s, labels)``
    (``Parametrization.distillation_loss``: u-muP's ``ops.kl_divergence`` and
    ``ops.cross_entropy``, plain ones for SP) with ``s`` the student's logits and ``t`` the
    teacher's (``Task.outputs`` of both; the teacher's loss multiplier applied by its
    parametrization's ``loss_logits``). The teacher's forward pass runs inside the jitted
    step on the train state's ``teacher`` entry (``bind``), never optimised or checkpointed.
    Validation, metrics and predictions are the base task's (the labels' cross-entropy), so a
    distilled run's validation loss compares with one trained alone.

    Args:
      base: the task the student learns (``LanguageModelling`` or
        ``SequenceClassification``).
      teacher_graphdef: the teacher model's graph (eval mode, the student's precision).
      temperature: ``T > 0``.
      weight: ``a`` in ``[0, 1]``.
      teacher: the teacher's parameters (pure dict); set by ``bind`` in the step.
    """

    def __init__(self, base: Task, teacher_graphdef: Any, *, temperature: float, weight: float,
                 teacher: Any = None):
        self.base, self.teacher_graphdef = base, teacher_graphdef
        self.temperature, self.weight, self.teacher = float(temperature), float(weight), teacher
        self.objective, self.model_class = base.objective, base.model_class

    def bind(self, teacher):
        return Distillation(self.base, self.teacher_graphdef, temperature=self.temperature,
                            weight=self.weight, teacher=teacher)

    def make_model(self, config, rngs):
        return self.base.make_model(config, rngs)

    def max_seq_len(self, seq_len, data_config):
        return self.base.max_seq_len(seq_len, data_config)

    def eval_sums(self, model, batch):
        return self.base.eval_sums(model, batch)

    def metrics(self, means, bytes_per_token):
        return self.base.metrics(means, bytes_per_token)

    def predict(self, model, batch):
        return self.base.predict(model, batch)

    def outputs(self, model, batch, rng):
        return self.base.outputs(model, batch, rng)

    def teacher_logits(self, batch: dict) -> jax.Array:
        """The teacher's logits of a batch as its softmax reads them (no gradient)."""
        if self.teacher is None:
            raise ValueError("Distillation.loss needs the teacher's parameters: call it on "
                             "task.bind(teacher_params) (the train step does).")
        teacher = nnx.merge(self.teacher_graphdef, jax.lax.stop_gradient(self.teacher))
        logits, _, _ = self.base.outputs(teacher, batch, None)
        c = teacher.config
        return jax.lax.stop_gradient(c.parametrization.loss_logits(logits, c.loss_mult))

    def loss(self, model, batch, rng):
        logits, labels, where = self.base.outputs(model, batch, rng)
        c = model.config
        loss = c.parametrization.distillation_loss(
            logits, labels, self.teacher_logits(batch), temperature=self.temperature,
            weight=self.weight, mult=c.loss_mult, where=where)
        return loss, (jnp.sum(where) if where is not None else jnp.asarray(labels.size))


TASKS: dict[str, Task] = {"decoder": LanguageModelling(), "encoder": MaskedLanguageModelling(),
                          "encdec": SpanCorruption()}
"""``--model`` -> its task."""


def get_task(kind: str) -> Task:
    """The task of ``--model kind``.

    Raises:
      UsageError: unknown kind.
    """
    if kind not in TASKS:
        raise UsageError(f"--model {kind!r} is not a model kind; choose one of "
                         f"{', '.join(TASKS)}.")
    return TASKS[kind]
