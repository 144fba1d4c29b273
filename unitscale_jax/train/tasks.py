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


class LanguageModelling(Task):
    """Next-token prediction with a causal decoder (``TransformerDecoder.loss``)."""

    objective, model_class = "lm", nn.TransformerDecoder

    def loss(self, model, batch, rng):
        loss = model.loss(batch["inputs"], batch["where"], targets=batch["targets"], rng=rng)
        return loss, jnp.sum(batch["where"])


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
