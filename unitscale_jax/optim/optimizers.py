"""The u-muP optimizers: ``adam``, ``adamw`` and ``sgd`` as Optax chains.

Each is::

    optimizer normalisation (scale_by_adam | trace)
      -> scale_by_umup (per-tensor u-muP factor)
      -> add_independent_weight_decay (lambda / eta_peak * theta, weights only by default)
      -> scale_by_learning_rate (eta_t, a float or any optax schedule; negates)

so that parameter ``theta`` with factor ``f`` moves by ``-eta_t (f * normalised_grad +
lambda / eta_peak * theta)``. This is the JAX counterpart of ``unit_scaling.optim.Adam/AdamW/SGD``
(which set per-parameter-group learning rates ``eta * f`` and weight decay ``lambda / (eta f)``).
All factories work inside ``optax.inject_hyperparams`` (``learning_rate`` can then be changed
between steps through ``state.hyperparams["learning_rate"]``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import optax

from unitscale_jax.optim.umup import scale_by_umup
from unitscale_jax.optim.weight_decay import (
    DEFAULT_DECAY_TYPES,
    ScalarOrSchedule,
    add_independent_weight_decay,
    resolve_peak_learning_rate,
)
from unitscale_jax.params import ParamInfo


def _tail(learning_rate, param_info, *, optimizer, readout_constraint, weight_decay,
          weight_decay_types, weight_decay_mask, peak_learning_rate, default, allow_missing):
    parts = [scale_by_umup(param_info, optimizer=optimizer, readout_constraint=readout_constraint,
                           default=default, allow_missing=allow_missing)]
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        parts.append(add_independent_weight_decay(
            weight_decay, resolve_peak_learning_rate(learning_rate, peak_learning_rate),
            param_info=param_info, decay_types=weight_decay_types, mask=weight_decay_mask,
            default=default, allow_missing=allow_missing))
    parts.append(optax.scale_by_learning_rate(learning_rate))
    return parts


def adamw(
    learning_rate: ScalarOrSchedule,
    *,
    param_info: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 1e-4,
    weight_decay_types: Sequence[str] = DEFAULT_DECAY_TYPES,
    weight_decay_mask: Optional[Union[Any, Callable[[Any], Any]]] = None,
    peak_learning_rate: Optional[float] = None,
    mu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    default: Optional[ParamInfo] = None,
    allow_missing: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """u-muP AdamW: ``scale_by_adam -> scale_by_umup -> independent decay -> learning rate``.

    Args:
      learning_rate: ``eta``: a float or an optax schedule (``step -> eta_t``). u-muP's optimum
        is near 1 (2^0) for a unit-scaled model at any width.
      param_info: ``unitscale_jax.nn.param_info(model)`` (or the model).
      b1: as in ``optax.scale_by_adam``.
      b2: as in ``optax.scale_by_adam``.
      eps: as in ``optax.scale_by_adam``.
      eps_root: as in ``optax.scale_by_adam``.
      weight_decay: ``lambda``: each step decays the selected parameters by
        ``lambda * eta_t / eta_peak`` (independent weight decay).
      weight_decay_types: parameter types decayed (default weight, embedding, output).
      weight_decay_mask: optional optax-style mask on top of ``weight_decay_types`` (under
        ``inject_hyperparams`` pass a callable mask via ``static_args``).
      peak_learning_rate: ``eta_peak``; default as in
        ``unitscale_jax.optim.resolve_peak_learning_rate`` (the float, or the schedule's
        ``peak_value``; a plain optax schedule needs it given).
      mu_dtype: as in ``optax.scale_by_adam``.
      nesterov: as in ``optax.scale_by_adam``.
      default: ``ParamInfo`` for parameters without u-muP metadata (see ``scale_by_umup``).
      allow_missing: factor 1 for parameters without metadata (see ``scale_by_umup``).

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                            nesterov=nesterov),
        *_tail(learning_rate, param_info, optimizer="adam", readout_constraint=None,
               weight_decay=weight_decay, weight_decay_types=weight_decay_types,
               weight_decay_mask=weight_decay_mask, peak_learning_rate=peak_learning_rate,
               default=default, allow_missing=allow_missing))


def adam(
    learning_rate: ScalarOrSchedule,
    *,
    param_info: Any,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    weight_decay_types: Sequence[str] = DEFAULT_DECAY_TYPES,
    weight_decay_mask: Optional[Union[Any, Callable[[Any], Any]]] = None,
    peak_learning_rate: Optional[float] = None,
    mu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    default: Optional[ParamInfo] = None,
    allow_missing: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """u-muP Adam: ``adamw`` with ``weight_decay = 0`` by default (arguments as in ``adamw``)."""
    return adamw(learning_rate, param_info=param_info, b1=b1, b2=b2, eps=eps, eps_root=eps_root,
                 weight_decay=weight_decay, weight_decay_types=weight_decay_types,
                 weight_decay_mask=weight_decay_mask, peak_learning_rate=peak_learning_rate,
                 mu_dtype=mu_dtype, nesterov=nesterov, default=default,
                 allow_missing=allow_missing)


def sgd(
    learning_rate: ScalarOrSchedule,
    *,
    param_info: Any,
    momentum: Optional[float] = None,
    nesterov: bool = False,
    readout_constraint: Optional[str] = None,
    weight_decay: float = 0.0,
    weight_decay_types: Sequence[str] = DEFAULT_DECAY_TYPES,
    weight_decay_mask: Optional[Union[Any, Callable[[Any], Any]]] = None,
    peak_learning_rate: Optional[float] = None,
    accumulator_dtype: Optional[Any] = None,
    default: Optional[ParamInfo] = None,
    allow_missing: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """u-muP SGD: ``trace (momentum) -> scale_by_umup("sgd") -> independent decay -> lr``.

    With the default ``readout_constraint=None`` the factors are Adam's (the unconstrained
    readout keeps gradients, hence SGD updates, unit-scaled); with ``"to_output_scale"`` they
    follow the reference's SGD rule (see ``umup_factor``). The weight decay is decoupled from
    the momentum (unlike ``torch.optim.SGD``'s, which enters the gradient).

    Args:
      learning_rate: ``eta``: a float or an optax schedule.
      param_info: ``unitscale_jax.nn.param_info(model)`` (or the model).
      momentum: momentum coefficient, or None for plain SGD.
      nesterov: as in ``optax.trace``.
      readout_constraint: the ``constraint`` the model's readout uses (None or
        ``"to_output_scale"``).
      weight_decay: as in ``adamw``.
      weight_decay_types: as in ``adamw``.
      weight_decay_mask: as in ``adamw``.
      peak_learning_rate: as in ``adamw``.
      accumulator_dtype: as in ``optax.trace``.
      default: as in ``adamw``.
      allow_missing: as in ``adamw``.

    Returns:
      An ``optax.GradientTransformationExtraArgs``.
    """
    head = ([] if momentum is None else
            [optax.trace(decay=momentum, nesterov=nesterov, accumulator_dtype=accumulator_dtype)])
    return optax.chain(
        *head,
        *_tail(learning_rate, param_info, optimizer="sgd", readout_constraint=readout_constraint,
               weight_decay=weight_decay, weight_decay_types=weight_decay_types,
               weight_decay_mask=weight_decay_mask, peak_learning_rate=peak_learning_rate,
               default=default, allow_missing=allow_missing))
