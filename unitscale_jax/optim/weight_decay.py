"""Independent (learning-rate-decoupled) weight decay for the u-muP optimizers.

u-muP (Blake et al., 2025; as in Wortsman et al., 2023, arXiv 2309.14322) uses
*independent* weight decay: each step decays a parameter by ``lambda * eta_t / eta_peak``,
a fraction that follows the learning-rate schedule but depends neither on the peak learning
rate nor on the parameter's u-muP factor, so sweeping ``eta`` does not change the decay.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import optax

from unitscale_jax.optim._tree import InfoLookup, array_keys, map_arrays
from unitscale_jax.params import PARAM_TYPES, ParamInfo

ScalarOrSchedule = Union[float, jax.Array, optax.Schedule]

#: Parameter types decayed by default: the matrices (hidden weights, embedding, readout).
DEFAULT_DECAY_TYPES = ("weight", "embedding", "output")


def resolve_peak_learning_rate(learning_rate: ScalarOrSchedule,
                               peak_learning_rate: Optional[float] = None) -> Any:
    """``eta_peak`` of the independent weight decay, always given, never probed:

    1. ``peak_learning_rate`` if given (what a plain optax schedule needs);
    2. else, for a schedule with a ``peak_value`` attribute (the schedules of
       ``unitscale_jax.optim.schedules`` carry the peak they were built with), that value;
    3. else, for a number (or an array injected by ``optax.inject_hyperparams``), the learning
       rate itself, so ``eta_t / eta_peak = 1``.

    Case 3 means that under ``optax.inject_hyperparams`` the decay stays ``lambda`` per step when
    the learning rate is changed; pass ``peak_learning_rate`` to make it follow ``eta_t``.

    Raises:
      ValueError: a schedule without ``peak_value`` and no ``peak_learning_rate``, or a peak
        that is not positive.
    """
    if peak_learning_rate is not None:
        peak = peak_learning_rate
    elif callable(learning_rate):
        peak = getattr(learning_rate, "peak_value", None)
        if peak is None:
            raise ValueError(
                "independent weight decay needs the schedule's peak learning rate: pass "
                "peak_learning_rate=... (the value the schedule was built with), or use a "
                "schedule of unitscale_jax.optim, which carries it.")
    else:
        peak = learning_rate
    if isinstance(peak, (int, float)) and not peak > 0:
        raise ValueError(
            f"The peak learning rate for independent weight decay must be > 0, got {peak}. "
            "Pass peak_learning_rate=... explicitly (or weight_decay=0).")
    return peak


def add_independent_weight_decay(
    weight_decay: Union[float, jax.Array],
    peak_learning_rate: Union[float, jax.Array],
    *,
    param_info: Any = None,
    decay_types: Sequence[str] = DEFAULT_DECAY_TYPES,
    mask: Optional[Union[Any, Callable[[Any], Any]]] = None,
    default: Optional[ParamInfo] = None,
    allow_missing: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """Adds ``(weight_decay / eta_peak) * theta`` to the updates of the selected parameters.

    Followed by ``optax.scale_by_learning_rate(eta_t)`` this decays ``theta`` by
    ``weight_decay * eta_t / eta_peak`` per step, independently of any per-parameter factor
    applied earlier in the chain.

    Args:
      weight_decay: ``lambda``, the per-step decay fraction at the peak learning rate.
      peak_learning_rate: ``eta_peak`` (see ``resolve_peak_learning_rate``).
      param_info: tree of ``ParamInfo``; if given only parameters whose type is in
        ``decay_types`` are decayed (parameters without metadata are not decayed). If None,
        every leaf is decayed (subject to ``mask``).
      decay_types: parameter types to decay; default: weight, embedding and output (not biases
        or norm gains).
      mask: optional optax-style mask (tree of bools or callable ``params -> tree``), applied on
        top of ``decay_types``.
      default: as in ``scale_by_umup``.
      allow_missing: as in ``scale_by_umup``.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` that needs ``params`` in ``update``.
    """
    bad = [t for t in decay_types if t not in PARAM_TYPES]
    if bad:
        raise ValueError(f"decay_types must be drawn from {PARAM_TYPES}, got {bad}.")
    lookup = (None if param_info is None else
              InfoLookup(param_info, default=default, allow_missing=allow_missing))

    def selected(tree):
        keys = array_keys(tree)
        if lookup is None:
            return {k: True for k in keys}
        return {k: i is not None and i.type in decay_types for k, i in lookup.resolve(keys).items()}

    def init_fn(params):
        selected(params)
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "Independent weight decay needs the parameters: "
                "call tx.update(grads, state, params).")
        sel = selected(updates)
        coeff = (jnp.asarray(weight_decay, jnp.float32)
                 / jnp.asarray(peak_learning_rate, jnp.float32))

        def decay(k, u, p):
            return (u + (coeff * p).astype(u.dtype)) if sel[k] else u

        return map_arrays(decay, updates, params), state

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)
