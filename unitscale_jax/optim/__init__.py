"""Optax transforms for unit scaling and u-muP (``unitscale_jax.optim``).

* ``unit_scale()``: divides each gradient leaf by a running RMS estimate (any model, any
  optimizer): ``optax.chain(unit_scale(), optax.adamw(schedule))``.
* ``scale_by_umup(param_info)``: the per-tensor u-muP learning-rate factors.
* ``adam`` / ``adamw`` / ``sgd``: the full u-muP optimizers
  (``adamw(schedule, param_info=unitscale_jax.nn.param_info(model), weight_decay=0.1)``).
* ``scale_by_mup(param_info)``, ``mup_adam`` / ``mup_adamw``: muP's Adam rule (hidden weights
  at ``base_fan_in / fan_in`` of the learning rate; Tensor Programs V, table 3).
* ``warmup_cosine``, ``exponential_decay``, ``reduce_on_plateau``: schedules.
* ``checks``: chex-checked invariants of these transforms (unit RMS, loss-scale invariance,
  u-muP's first step, finite updates).

Parameter metadata comes from ``unitscale_jax.params``; this package never imports the
models (``unitscale_jax.nn``).
"""

from unitscale_jax.optim import checks
from unitscale_jax.optim.mup import (
    DEFAULT_BASE_FAN_IN,
    mup_adam,
    mup_adamw,
    mup_factor,
    mup_factors,
    scale_by_mup,
)
from unitscale_jax.optim.optimizers import adam, adamw, sgd
from unitscale_jax.optim.schedules import exponential_decay, reduce_on_plateau, warmup_cosine
from unitscale_jax.optim.umup import (
    OPTIMIZERS,
    READOUT_CONSTRAINTS,
    scale_by_umup,
    umup_factor,
    umup_factors,
)
from unitscale_jax.optim.unit_scale import UnitScaleState, unit_scale
from unitscale_jax.optim.weight_decay import (
    DEFAULT_DECAY_TYPES,
    add_independent_weight_decay,
    resolve_peak_learning_rate,
)

__all__ = [
    "DEFAULT_BASE_FAN_IN", "DEFAULT_DECAY_TYPES", "OPTIMIZERS", "READOUT_CONSTRAINTS",
    "UnitScaleState", "adam", "checks", "adamw", "add_independent_weight_decay",
    "exponential_decay", "mup_adam", "mup_adamw", "mup_factor", "mup_factors",
    "reduce_on_plateau", "resolve_peak_learning_rate", "scale_by_mup",
    "scale_by_umup", "sgd",
    "umup_factor",
    "umup_factors", "unit_scale", "warmup_cosine",
]
