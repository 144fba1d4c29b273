"""u-muP per-tensor learning-rate factors and the ``scale_by_umup`` transform.

Rules from Blake et al., "u-muP: The Unit-Scaled Maximal Update Parametrization" (ICLR 2025,
arXiv 2407.17465, table 2) and the authors' library ``unit_scaling.optim`` 0.3.5
(``lr_scale_func_adam`` / ``lr_scale_func_sgd``), with the fan-in taken from the explicit
``ParamInfo.fan_in`` rather than from the shape.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from unitscale_jax.optim._tree import scale_by_info
from unitscale_jax.params import ParamInfo

OPTIMIZERS = ("adam", "sgd")
READOUT_CONSTRAINTS = (None, "to_output_scale")


def _check_rule(optimizer: str, readout_constraint: Optional[str]) -> None:
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}.")
    if readout_constraint not in READOUT_CONSTRAINTS:
        raise ValueError(
            f"readout_constraint must be one of {READOUT_CONSTRAINTS} (the constraint of the "
            f"model's linear_readout), got {readout_constraint!r}.")


def umup_factor(info: ParamInfo, optimizer: str = "adam",
                readout_constraint: Optional[str] = None) -> float:
    """The u-muP learning-rate factor of one parameter (multiplies the global learning rate).

    Adam family, and SGD with the default unconstrained readout (``readout_constraint=None``,
    whose gradients are unit-scaled, so SGD's updates are too, as Adam's are):

    ============  ==============
    type          factor
    ============  ==============
    weight        fan_in^-1/2
    embedding     fan_in^-1/2 (fan_in = d_model)
    output        1
    bias, norm    1
    ============  ==============

    SGD with ``readout_constraint="to_output_scale"`` (the reference's ``lr_scale_func_sgd``):
    weight and embedding fan_in^+1/2, bias and norm fan_in (their size), output 1.

    In both cases the factor is multiplied by ``depth^(alpha - 1)`` for a parameter inside a
    residual stack of ``depth`` layers, ``alpha = info.depth_exponent``: ``depth^-1/2`` at
    u-muP's (depth-muP's) ``alpha = 1/2``, and 1 at CompleteP's ``alpha = 1`` (Dey et al.,
    "Don't be lazy: CompleteP enables compute-efficient deep transformers", 2025, table 1:
    Adam's hidden-weight learning rate ``L^(alpha - 1)``), whose residual branches are
    weighted ``L^-1`` instead (``ops.transformer_residual_scaling_rule``). CompleteP's other
    depth corrections (Adam's epsilon, weight decay) are not applied: u-muP's gradients are
    unit-scaled, so epsilon stays negligible, and weight decay is independent here
    (``optim.weight_decay``).

    Args:
      info: the parameter's ``ParamInfo``.
      optimizer: ``"adam"`` (Adam, AdamW and other per-coordinate normalising optimizers) or
        ``"sgd"``.
      readout_constraint: the ``constraint`` of the model's readout (SGD only).

    Returns:
      The factor as a Python float.
    """
    _check_rule(optimizer, readout_constraint)
    depth_factor = (1.0 if info.depth is None
                    else float(info.depth) ** (float(info.depth_exponent) - 1.0))
    if info.type in ("output",):
        return depth_factor
    if optimizer == "sgd" and readout_constraint == "to_output_scale":
        if info.type in ("bias", "norm"):
            return depth_factor * float(info.fan_in)
        return depth_factor * float(info.fan_in) ** 0.5
    if info.type in ("bias", "norm"):
        return depth_factor
    return depth_factor * float(info.fan_in) ** -0.5


def umup_factors(param_info: Any, optimizer: str = "adam",
                 readout_constraint: Optional[str] = None) -> Any:
    """``umup_factor`` mapped over a ``param_info`` tree (``None`` entries stay ``None``)."""
    return jax.tree_util.tree_map(
        lambda i: None if i is None else umup_factor(i, optimizer, readout_constraint),
        param_info, is_leaf=lambda x: x is None or isinstance(x, ParamInfo))


def scale_by_umup(param_info: Any, *, optimizer: str = "adam",
                  readout_constraint: Optional[str] = None, default: Optional[ParamInfo] = None,
                  allow_missing: bool = False) -> optax.GradientTransformationExtraArgs:
    """Multiplies each update leaf by its u-muP factor (``umup_factor``).

    Place it after the optimizer's normalisation (``scale_by_adam`` / ``trace``) and before the
    learning rate: Adam is invariant to a constant per-tensor scale of its input, so a factor
    applied before it would have no effect.

    Leaves are matched to ``param_info`` by tree path (see ``unitscale_jax.optim._tree``): the
    updates may be a plain dict, an ``nnx.State`` of arrays or of ``nnx.Variable`` wrappers,
    possibly containing ``None`` / ``optax.MaskedNode`` leaves (passed through).

    Args:
      param_info: ``unitscale_jax.nn.param_info(model)`` (an ``nnx.State`` of ``ParamInfo``
        parallel to ``nnx.state(model, nnx.Param)``), or the model itself.
      optimizer: ``"adam"`` or ``"sgd"``.
      readout_constraint: the model readout's constraint (matters for ``"sgd"`` only).
      default: ``ParamInfo`` used for parameters without metadata.
      allow_missing: if True, parameters without metadata (and no ``default``) get factor 1.

    Returns:
      A stateless ``optax.GradientTransformationExtraArgs``.

    Raises:
      ValueError: at ``init``/``update``, naming every parameter without metadata, unless
        ``default`` or ``allow_missing`` is given; or for an unknown rule.
    """
    _check_rule(optimizer, readout_constraint)
    return scale_by_info(param_info, lambda i: umup_factor(i, optimizer, readout_constraint),
                         default=default, allow_missing=allow_missing)
