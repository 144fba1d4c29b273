"""``--precision`` and ``--loss-scale``: the number formats a run trains in.

Each entry of ``PRECISIONS`` maps a name to the model's compute dtype and the
``unitscale_jax.precision`` policy the modules route their matmuls through
(``TransformerConfig.dtype`` / ``precision``):

===========  ===========  =====================================================================
name         compute      what runs in low precision
===========  ===========  =====================================================================
``fp32``     float32      nothing
``bf16``     bfloat16     every activation and every activation gradient (real bfloat16)
``fp16``     float16      every activation and every activation gradient (real float16: the
                          backward pass runs in float16 too, so small gradients underflow)
``fp8-sim``  float32      E4M3 simulated on every matmul input and weight (and q, k, v), E5M2
                          on every gradient entering a matmul's backward pass
``fp8``      bfloat16     the same formats as real float8 matmuls (``fp8_dot``, static
                          per-tensor scales of 1: unit scaling's; XLA uses FP8 tensor cores on
                          H100-class GPUs, an upcast on CPU)
===========  ===========  =====================================================================

Parameters and optimizer state stay float32 in every mode (mixed precision): the modules cast
the float32 master weights to the compute dtype in the forward pass, so each weight's
gradient is computed in the compute dtype and cast back to float32 by the transpose of that
cast. Loss, log-softmax and norm statistics are computed in float32 (the SP cross-entropy
casts the logits up; u-muP's ops do the same), the rest of the backward pass in the compute
dtype.

Static loss scaling (``--loss-scale S``, Micikevicius et al., "Mixed Precision Training",
ICLR 2018): the train step differentiates ``S * loss`` and divides the float32 gradients by
``S``. It lifts the small gradients of standard-parametrization (SP) models out of the
float16 / E5M2 underflow range; u-muP models need none (their gradients are unit scale).
Too large an ``S`` overflows instead: a step whose gradients hold inf or NaN is skipped
(parameters and optimizer state unchanged; ``optax.apply_if_finite``) and counted in the
``skipped_steps`` metric. After ``MAX_CONSECUTIVE_OVERFLOWS`` consecutive overflowing steps
the update is applied anyway, the parameters become non-finite and the run stops with a
``TrainingStopped`` message naming ``--loss-scale``. Without ``--loss-scale`` no step is
skipped: any non-finite loss or gradient stops the run at once (the last good checkpoint is
kept). A non-finite *loss* (a forward overflow) always stops the run.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

from unitscale_jax.train.errors import UsageError

MAX_CONSECUTIVE_OVERFLOWS = 20
"""Overflowing (skipped) steps in a row after which a loss-scaled run gives up."""


@dataclasses.dataclass(frozen=True)
class PrecisionSetup:
    """What a ``--precision`` name sets on the model.

    Attributes:
      dtype: compute dtype of activations (``TransformerConfig.dtype``).
      policy: a ``unitscale_jax.precision.PrecisionPolicy`` or None (plain compute dtype).
    """

    dtype: str
    policy: Any = None


def _fp32() -> PrecisionSetup:
    return PrecisionSetup("float32", None)


def _preset(dtype: str, name: str) -> Callable[[], PrecisionSetup]:
    def setup() -> PrecisionSetup:
        from unitscale_jax.precision import get_policy
        return PrecisionSetup(dtype, get_policy(name))
    setup.__name__ = f"_{name.replace('-', '_')}"
    return setup


_bf16 = _preset("bfloat16", "bf16")

PRECISIONS: dict[str, Callable[[], PrecisionSetup]] = {
    "fp32": _fp32,
    "bf16": _bf16,
    "fp16": _preset("float16", "fp16"),
    "fp8-sim": _preset("float32", "fp8-sim"),
    "fp8": _preset("bfloat16", "fp8"),
}


def precision_setup(name: str) -> PrecisionSetup:
    """The ``PrecisionSetup`` of ``--precision name``.

    Raises:
      UsageError: unknown name.
    """
    if name not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}; got {name!r}.")
    return PRECISIONS[name]()


def policy_name(setup: PrecisionSetup) -> Optional[str]:
    return None if setup.policy is None else getattr(setup.policy, "name", str(setup.policy))


# --------------------------------------------------------------------------- loss scaling

def guard_optimizer(tx, loss_scale: Optional[float]):
    """``tx`` itself without a loss scale; with one, ``tx`` wrapped to skip steps whose
    gradients are not finite (``optax.apply_if_finite``, at most
    ``MAX_CONSECUTIVE_OVERFLOWS`` in a row)."""
    if loss_scale is None:
        return tx
    import optax
    return optax.apply_if_finite(tx, MAX_CONSECUTIVE_OVERFLOWS)


def skipped_steps(opt_state: Any):
    """Steps skipped so far for non-finite gradients (an int32 scalar; 0 without a guard)."""
    import jax
    import jax.numpy as jnp
    import optax
    found = [s.total_notfinite for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: isinstance(x, optax.ApplyIfFiniteState))
        if isinstance(s, optax.ApplyIfFiniteState)]
    return found[0] if found else jnp.int32(0)


def scale_loss(loss_fn: Callable, loss_scale: Optional[float]) -> Callable:
    """``params -> (S * loss, (loss, aux))`` from ``loss_fn: params -> (loss, aux)``.

    Differentiate it with ``jax.value_and_grad(..., has_aux=True)`` and pass the gradients
    through ``unscale_grads``. ``S = 1`` (no multiplication) without a loss scale.
    """

    def scaled(params):
        loss, aux = loss_fn(params)
        out = loss if loss_scale is None else loss * loss_scale
        return out, (loss, aux)

    return scaled


def unscale_grads(grads: Any, loss_scale: Optional[float]) -> Any:
    """Gradients of ``S * loss`` -> gradients of ``loss`` (division in float32)."""
    if loss_scale is None:
        return grads
    import jax
    import jax.numpy as jnp
    inv = 1.0 / loss_scale
    return jax.tree.map(lambda g: (g.astype(jnp.float32) * inv).astype(g.dtype), grads)
