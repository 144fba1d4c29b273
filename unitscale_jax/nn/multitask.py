"""``MultiTaskEncoder``: one ``TransformerEncoder`` trunk with a readout head per task.

Each task's head is a ``LinearReadout`` (``make_readout``, role ``cls_head`` for a sentence
classifier, ``token_head`` for a tagger), stored as the attribute ``head_<name>``; the trunk
(``embed``, ``stack``, ``final_norm``) and the optional MLM ``readout`` are the encoder's own.
``view(name)`` is the encoder as one task sees it: its ``cls_head`` / ``token_head`` is that
task's head, so the single-task losses and predictions (``TransformerEncoder.classify``,
``classification_loss``, ``tag``, ...) run unchanged on it.

Unit scaling: each head is a readout, and the trunk receives the sum of the task gradients.
A sum of ``n`` independent unit-scaled terms weighted by ``w_i`` has scale
``sqrt(sum w_i^2)``, so the add rule (``ops.add``: ``2^-1/2`` for two unit terms) divides by
it: ``trunk_grad_scale(weights)``. A view built with that scale multiplies the gradient that
leaves its trunk output by it (``ops.scale_bwd``), which keeps the trunk's gradient at the
single-task scale whatever the number of tasks.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import jax
from flax import nnx

from unitscale_jax import ops
from unitscale_jax.nn.encoder import TransformerEncoder
from unitscale_jax.nn.layers import make_readout

HEAD_KINDS = {"classify": "cls_head", "tag": "token_head", "mlm": "readout"}
"""A head's kind -> the ``TransformerEncoder`` head attribute (and readout role) it stands
for; an ``mlm`` task (masked-LM as an auxiliary task) uses the encoder's own vocabulary
``readout``."""


def trunk_grad_scale(weights: Sequence[float]) -> float:
    """The add rule for a weighted sum of independent unit-scaled gradients:
    ``(sum w_i^2)^-1/2`` over the nonzero weights (``2^-1/2`` for two unit terms, as
    ``ops.add``; 1 for a single task of weight 1).

    Raises:
      ValueError: a negative weight, or no positive one.
    """
    weights = [float(w) for w in weights]
    if any(w < 0 or not math.isfinite(w) for w in weights) or not any(w > 0 for w in weights):
        raise ValueError(f"trunk_grad_scale: the weights must be finite, >= 0, and one > 0; got "
                         f"{weights}.")
    return sum(w * w for w in weights) ** -0.5


class MultiTaskEncoder(TransformerEncoder):
    """A ``TransformerEncoder`` trunk with one readout head per task.

    Args:
      config: ``TransformerConfig`` (keyword arguments override its fields, or build it).
      rngs: ``nnx.Rngs``.
      heads: ``{name: (kind, n_out)}`` with kind ``classify`` or ``tag`` and ``n_out >= 2``
        classes / tags, or at most one ``mlm`` (its ``n_out`` is ignored: the encoder's
        vocabulary ``readout``); a name is a Python identifier.
      mlm_head: build the vocabulary readout (always, with an ``mlm`` task).
      pooling: sentence representation of the classification heads (``cls`` / ``mean``).
    """

    def __init__(self, config: Any = None, *, rngs: nnx.Rngs,
                 heads: Mapping[str, tuple[str, int]], mlm_head: bool = False,
                 pooling: str = "mean", **overrides: Any):
        mlm = [name for name, (kind, _) in heads.items() if kind == "mlm"]
        super().__init__(config, rngs=rngs, mlm_head=mlm_head or bool(mlm), pooling=pooling,
                         **overrides)
        if not heads:
            raise ValueError("MultiTaskEncoder: heads is empty; give at least one task head.")
        if len(mlm) > 1:
            raise ValueError(f"MultiTaskEncoder: one mlm head at most (the vocabulary readout); "
                             f"got {mlm}.")
        kinds = []
        for name, (kind, n) in heads.items():
            if not (isinstance(name, str) and name.isidentifier()):
                raise ValueError(f"MultiTaskEncoder: head name {name!r} is not an identifier.")
            if kind not in HEAD_KINDS:
                raise ValueError(f"MultiTaskEncoder: head {name!r} has kind {kind!r}; choose "
                                 f"one of {', '.join(HEAD_KINDS)}.")
            if kind == "mlm":
                kinds.append((name, kind))
                continue
            if not isinstance(n, int) or n < 2:
                raise ValueError(f"MultiTaskEncoder: head {name!r} needs an int >= 2 outputs, "
                                 f"got {n!r}.")
            setattr(self, f"head_{name}", make_readout(self.config, rngs, n,
                                                       role=HEAD_KINDS[kind],
                                                       sharding=("embed", None)))
            kinds.append((name, kind))
        self.head_kinds = tuple(kinds)

    def view(self, name: str, trunk_grad_scale: float = 1.0) -> "HeadView":
        """The encoder as task ``name`` sees it (``HeadView``)."""
        kinds = dict(self.head_kinds)
        if name not in kinds:
            raise ValueError(f"MultiTaskEncoder has no head {name!r} (have "
                             f"{', '.join(kinds)}).")
        head = self.readout if kinds[name] == "mlm" else getattr(self, f"head_{name}")
        return HeadView(self, head, kinds[name], trunk_grad_scale)


class HeadView:
    """A ``MultiTaskEncoder`` with one task's head in the place of ``cls_head`` /
    ``token_head`` (the other is None; an ``mlm`` task's is the model's ``readout``), and
    the gradient leaving its trunk output multiplied by ``trunk_grad_scale``.
    ``TransformerEncoder``'s methods run on it as on a single-task encoder; every other
    attribute is the model's."""

    def __init__(self, model: MultiTaskEncoder, head: Any, kind: str, trunk_grad_scale: float):
        self._model, self._scale = model, float(trunk_grad_scale)
        self.cls_head = head if kind == "classify" else None
        self.token_head = head if kind == "tag" else None
        self.readout = head if kind == "mlm" else model.readout

    def __call__(self, ids: jax.Array, *, mask: Optional[jax.Array] = None,
                 rng: Optional[jax.Array] = None) -> jax.Array:
        """MLM logits ``[batch, seq, vocab]`` (``TransformerEncoder.__call__`` on this view)."""
        return TransformerEncoder.__call__(self, ids, mask=mask, rng=rng)

    def encode(self, ids: jax.Array, *, mask: Optional[jax.Array] = None,
               rng: Optional[jax.Array] = None) -> jax.Array:
        """The trunk's ``[batch, seq, d_model]`` output, its gradient scaled."""
        return ops.scale_bwd(self._model.encode(ids, mask=mask, rng=rng), self._scale)

    def __getattr__(self, attr: str) -> Any:
        method = getattr(TransformerEncoder, attr, None)
        if callable(method) and not isinstance(method, type):
            return method.__get__(self)  # the encoder's method, on this view's heads
        return getattr(self._model, attr)


__all__ = ["HEAD_KINDS", "HeadView", "MultiTaskEncoder", "trunk_grad_scale"]
