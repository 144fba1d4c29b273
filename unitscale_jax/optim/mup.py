"""muP's Adam rule: per-tensor learning-rate factors, ``scale_by_mup`` and ``mup_adam(w)``.

muP (Yang et al., "Tensor Programs V", arXiv 2203.03466, table 3; tables 8-9 for the
multiplier forms) trains with Adam at a learning rate ``eta / fan_in`` for hidden weights and
``eta`` for input weights (the embedding), biases and norm gains; with the readout written as
``W x / fan_in`` (``unitscale_jax.nn.MuP``: output weights N(0, 1) times ``1/fan_in`` in the
forward pass, table 9) the output weights also take ``eta``. The reference library ``mup``
(``MuAdam``) does the same with ``width_mult = fan_in / base_fan_in``: matrix-like
parameters (both dimensions growing with width) get ``lr / width_mult``, everything else
``lr``. Here the fan-in comes from ``ParamInfo.fan_in`` (never the shape) and ``base_fan_in``
is the fan-in at which a hidden weight takes the global ``eta`` itself.

Unlike u-muP's rule (``unitscale_jax.optim.umup``) there is no depth factor: muP's residual
branches are not weighted by depth (``MuP.residual`` is ``x + f(x)``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import optax

from unitscale_jax.optim._tree import scale_by_info
from unitscale_jax.optim.weight_decay import (
    DEFAULT_DECAY_TYPES,
    ScalarOrSchedule,
    add_independent_weight_decay,
)
from unitscale_jax.params import ParamInfo

DEFAULT_BASE_FAN_IN = 64
"""The fan-in at which a muP hidden weight takes the global learning rate (the trainer's default
``d_model`` and the narrowest width of ``unitscale_jax.analysis.coord_check``): a muP run at
that width steps its attention weights like an SP run with plain Adam."""


def _check_base(base_fan_in: float) -> float:
    if isinstance(base_fan_in, bool) or not float(base_fan_in) > 0:
        raise ValueError(f"base_fan_in must be a number > 0, got {base_fan_in!r}.")
    return float(base_fan_in)


def mup_factor(info: ParamInfo, base_fan_in: float = DEFAULT_BASE_FAN_IN) -> float:
    """The muP Adam learning-rate factor of one parameter (multiplies the global learning rate).

    ============  =========================
    type          factor
    ============  =========================
    weight        base_fan_in / fan_in
    embedding     1
    output        1 (the 1/fan_in is in the forward pass)
    bias, norm    1
    ============  =========================

    This is Tensor Programs V's table 3 Adam column (hidden weights ``eta / fan_in``) with
    ``eta`` measured at ``fan_in = base_fan_in``, and ``mup.MuAdam``'s ``lr / width_mult``
    when every hidden weight's base fan-in is ``base_fan_in``. A weight whose fan-in is a
    multiple of the width (the MLP's down projection, fan-in ``d_ff``) gets that multiple
    smaller a factor, a constant in width.

    Args:
      info: the parameter's ``ParamInfo`` (its ``depth`` is not used).
      base_fan_in: the fan-in at which a hidden weight's factor is 1 (> 0).

    Returns:
      The factor as a Python float.

    Raises:
      ValueError: ``base_fan_in`` not > 0.
    """
    base = _check_base(base_fan_in)
    return base / float(info.fan_in) if info.type == "weight" else 1.0


def mup_factors(param_info: Any, base_fan_in: float = DEFAULT_BASE_FAN_IN) -> Any:
    """``mup_factor`` mapped over a ``param_info`` tree (``None`` entries stay ``None``)."""
    return jax.tree_util.tree_map(
        lambda i: None if i is None else mup_factor(i, base_fan_in),
        param_info, is_leaf=lambda x: x is None or isinstance(x, ParamInfo))


def scale_by_mup(param_info: Any, *, base_fan_in: float = DEFAULT_BASE_FAN_IN,
                 default: Optional[ParamInfo] = None,
                 allow_missing: bool = False) -> optax.GradientTransformationExtraArgs:
    """Multiplies each update leaf by its muP Adam factor (``mup_factor``).

    Place it after Adam's normalisation (``optax.scale_by_adam``) and before the learning rate,
    as ``scale_by_umup``; leaves are matched to ``param_info`` by tree path in the same way.

    Args:
      param_info: ``unitscale_jax.nn.param_info(model)`` (or the model itself).
      base_fan_in: the fan-in at which a hidden weight's factor is 1.
      default: ``ParamInfo`` used for parameters without metadata.
      allow_missing: if True, parameters without metadata (and no ``default``) get factor 1.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: ``base_fan_in`` not > 0; at ``init``/``update``, naming every parameter
        without metadata, unless ``default`` or ``allow_missing`` is given.
    """
    base = _check_base(base_fan_in)
    return scale_by_info(param_info, lambda i: mup_factor(i, base), default=default,
                         allow_missing=allow_missing)


def mup_adamw(
    learning_rate: ScalarOrSchedule,
    *,
    param_info: Any,
    base_fan_in: float = DEFAULT_BASE_FAN_IN,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.01,
    weight_decay_types: Sequence[str] = DEFAULT_DECAY_TYPES,
    mu_dtype: Optional[Any] = None,
    nesterov: bool = False,
    default: Optional[ParamInfo] = None,
    allow_missing: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """muP AdamW: ``scale_by_adam -> + weight_decay * theta -> scale_by_mup -> learning rate``.

    A parameter with factor ``f`` moves by ``-eta_t f (adam_direction + weight_decay *
    theta)``: ``torch.optim.AdamW`` with per-group learning rates ``eta f``, which is what
    ``mup.MuAdamW`` builds (its default ``decoupled_wd=True`` leaves the decay coefficient
    alone, so the decay follows each group's learning rate, as optax's ``adamw`` does).

    Args:
      learning_rate: ``eta``: a float or an optax schedule.
      param_info: ``unitscale_jax.nn.param_info(model)`` (or the model).
      base_fan_in: the fan-in at which a hidden weight takes ``eta`` (``mup_factor``).
      b1: as in ``optax.scale_by_adam``.
      b2: as in ``optax.scale_by_adam``.
      eps: as in ``optax.scale_by_adam``.
      eps_root: as in ``optax.scale_by_adam``.
      weight_decay: coefficient of the decay (0 for none).
      weight_decay_types: parameter types decayed (default weight, embedding, output).
      mu_dtype: as in ``optax.scale_by_adam``.
      nesterov: as in ``optax.scale_by_adam``.
      default: ``ParamInfo`` for parameters without metadata (see ``scale_by_mup``).
      allow_missing: factor 1 (and no decay) for parameters without metadata.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (its ``update`` needs ``params`` when
      ``weight_decay`` is not 0).
    """
    parts = [optax.scale_by_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root, mu_dtype=mu_dtype,
                                 nesterov=nesterov)]
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        # "independent" decay relative to a peak of 1 adds weight_decay * theta, which the
        # muP factor and the learning rate then scale
        parts.append(add_independent_weight_decay(
            weight_decay, 1.0, param_info=param_info, decay_types=weight_decay_types,
            default=default, allow_missing=allow_missing))
    parts += [scale_by_mup(param_info, base_fan_in=base_fan_in, default=default,
                           allow_missing=allow_missing),
              optax.scale_by_learning_rate(learning_rate)]
    return optax.chain(*parts)


def mup_adam(learning_rate: ScalarOrSchedule, *, param_info: Any,
             base_fan_in: float = DEFAULT_BASE_FAN_IN, b1: float = 0.9, b2: float = 0.999,
             eps: float = 1e-8, **kwargs: Any) -> optax.GradientTransformationExtraArgs:
    """muP Adam: ``mup_adamw`` with ``weight_decay = 0`` (other arguments as there)."""
    return mup_adamw(learning_rate, param_info=param_info, base_fan_in=base_fan_in, b1=b1,
                     b2=b2, eps=eps, **{"weight_decay": 0.0, **kwargs})
