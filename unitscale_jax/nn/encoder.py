"""``TransformerEncoder``: a bidirectional (BERT-style) encoder with MLM and fine-tuning heads."""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.nn import _common
from unitscale_jax.nn.config import TransformerConfig, resolve_config
from unitscale_jax.nn.decoder import stack_outputs
from unitscale_jax.nn.layers import make_embedding, make_norm, make_readout
from unitscale_jax.nn.transformer import TransformerStack
from unitscale_jax.taps import tap

POOLINGS = ("cls", "mean")


class TransformerEncoder(nnx.Module):
    """Bidirectional Transformer encoder in u-muP (default), SP or muP form.

    Heads (all ``LinearReadout``, parameter type ``"output"``): ``readout`` to the vocabulary
    for masked-language-model pretraining (``mlm_head=True``), ``cls_head`` for sequence
    classification (``n_classes``) and ``token_head`` for token classification
    (``n_token_classes``, e.g. NER tags). Bidirectional attention cannot tell token order
    without positions: set ``rope=True`` for real text.

    Args:
      config: ``TransformerConfig`` (keyword arguments override its fields, or build it).
      rngs: ``nnx.Rngs``.
      n_classes: classes of the sequence-classification head (None: no head).
      n_token_classes: classes of the token-classification head (None: no head).
      mlm_head: build the vocabulary readout.
      pooling: sequence representation for ``classify``: ``"cls"`` (first token, BERT) or
        ``"mean"`` (mean over real tokens).
    """

    def __init__(self, config: Optional[TransformerConfig] = None, *, rngs: nnx.Rngs,
                 n_classes: Optional[int] = None, n_token_classes: Optional[int] = None,
                 mlm_head: bool = True, pooling: str = "cls", **overrides: Any):
        c = resolve_config(config, overrides)
        if pooling not in POOLINGS:
            raise ValueError(f"TransformerEncoder: pooling must be one of {POOLINGS}, "
                             f"got {pooling!r}.")
        for name, n in (("n_classes", n_classes), ("n_token_classes", n_token_classes)):
            if n is not None and (not isinstance(n, int) or n < 2):
                raise ValueError(f"TransformerEncoder: {name} must be an int >= 2 or None, "
                                 f"got {n!r}.")
        self.config = c
        self.pooling = pooling
        self.deterministic = False
        self.embed = make_embedding(c, rngs)
        self.stack = TransformerStack(c, n_layers=c.n_layers, rngs=rngs, causal=False)
        self.final_norm = make_norm(c, depth=None)

        self.readout = make_readout(c, rngs, c.vocab_size) if mlm_head else None
        self.cls_head = (make_readout(c, rngs, n_classes, role="cls_head", sharding=("embed", None))
                         if n_classes else None)
        self.token_head = (make_readout(c, rngs, n_token_classes, role="token_head",
                                        sharding=("embed", None)) if n_token_classes else None)

    def encode(self, ids: jax.Array, *, mask: Optional[jax.Array] = None,
               rng: Optional[jax.Array] = None) -> jax.Array:
        """Final-norm token representations ``[batch, seq, d_model]``.

        Args:
          ids: integer ``[batch, seq]``.
          mask: padding mask ``[batch, seq]`` (True = real token) or an attention mask.
          rng: PRNG key for dropout.
        """
        return stack_outputs(self, ids, mask, rng, "TransformerEncoder")

    def _need(self, head, name: str, arg: str):
        if head is None:
            raise ValueError(f"TransformerEncoder has no {name}; build it with {arg}.")
        return head

    def __call__(self, ids: jax.Array, *, mask: Optional[jax.Array] = None,
                 rng: Optional[jax.Array] = None) -> jax.Array:
        """MLM logits ``[batch, seq, vocab]``."""
        readout = self._need(self.readout, "MLM head", "mlm_head=True")
        return tap("logits", readout(self.encode(ids, mask=mask, rng=rng),
                                     rng=_common.head_key(rng)))

    def mlm_loss(self, ids: jax.Array, labels: jax.Array, where: Optional[jax.Array] = None, *,
                 mask: Optional[jax.Array] = None, rng: Optional[jax.Array] = None) -> jax.Array:
        """Masked-language-model cross-entropy (``ops.cross_entropy``, ``mult=loss_mult``).

        Args:
          ids: corrupted input ids ``[batch, seq]`` (e.g. some replaced by a [MASK] id).
          labels: original ids ``[batch, seq]``.
          where: boolean ``[batch, seq]``, True at the positions to predict (default all).
          mask: attention padding mask.
          rng: PRNG key for dropout.
        """
        c = self.config
        logits = self(ids, mask=mask, rng=rng)
        labels = _common.check_labels(labels, ids.shape, "TransformerEncoder.mlm_loss")
        where = _common.check_where(where, ids.shape, "TransformerEncoder.mlm_loss")
        return c.parametrization.cross_entropy(logits, labels, mult=c.loss_mult,
                                    where=where, check_ids=c.check_ids)

    def pool(self, hidden: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
        """Sequence representation ``[batch, d_model]`` (first token, or masked mean)."""
        if self.pooling == "cls":
            return hidden[:, 0]
        if mask is None or jnp.ndim(mask) != 2:
            return jnp.mean(hidden, axis=1)
        w = mask.astype(hidden.dtype)[..., None]
        return jnp.sum(hidden * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)

    def classify(self, ids: jax.Array, *, mask: Optional[jax.Array] = None,
                 rng: Optional[jax.Array] = None) -> jax.Array:
        """Sequence-classification logits ``[batch, n_classes]``."""
        head = self._need(self.cls_head, "sequence-classification head", "n_classes=...")
        return tap("cls_logits", head(self.pool(self.encode(ids, mask=mask, rng=rng), mask),
                                        rng=_common.head_key(rng)))

    def classification_loss(self, ids: jax.Array, labels: jax.Array,
                            where: Optional[jax.Array] = None, *,
                            mask: Optional[jax.Array] = None,
                            rng: Optional[jax.Array] = None) -> jax.Array:
        """Mean cross-entropy of the sequence labels ``[batch]`` (e.g. SST-2 sentiment).

        ``where`` (boolean ``[batch]``) selects the rows scored (default all), e.g. to leave
        out the padding rows of a final partial batch.
        """
        c = self.config
        logits = self.classify(ids, mask=mask, rng=rng)
        labels = _common.check_labels(labels, ids.shape[:1],
                                      "TransformerEncoder.classification_loss")
        where = _common.check_where(where, ids.shape[:1],
                                    "TransformerEncoder.classification_loss")
        return c.parametrization.cross_entropy(logits, labels, mult=c.loss_mult,
                                    where=where, check_ids=c.check_ids)

    def tag(self, ids: jax.Array, *, mask: Optional[jax.Array] = None,
            rng: Optional[jax.Array] = None) -> jax.Array:
        """Token-classification logits ``[batch, seq, n_token_classes]``."""
        head = self._need(self.token_head, "token-classification head", "n_token_classes=...")
        return tap("token_logits", head(self.encode(ids, mask=mask, rng=rng),
                                        rng=_common.head_key(rng)))

    def token_classification_loss(self, ids: jax.Array, labels: jax.Array,
                                  where: Optional[jax.Array] = None, *,
                                  mask: Optional[jax.Array] = None,
                                  rng: Optional[jax.Array] = None) -> jax.Array:
        """Mean cross-entropy of per-token labels ``[batch, seq]`` (e.g. NER tags).

        ``where`` selects the labelled tokens (default: all real tokens of a padding
        ``mask``, else all).
        """
        c = self.config
        logits = self.tag(ids, mask=mask, rng=rng)
        labels = _common.check_labels(labels, ids.shape,
                                      "TransformerEncoder.token_classification_loss")
        where = _common.check_where(where, ids.shape,
                                    "TransformerEncoder.token_classification_loss")
        if where is None and mask is not None and jnp.ndim(mask) == 2:
            where = mask
        return c.parametrization.cross_entropy(logits, labels, mult=c.loss_mult,
                                    where=where, check_ids=c.check_ids)
