"""u-muP parameter metadata carried on ``nnx.Param``.

u-muP's learning-rate rules (Blake et al., 2025, table 2) depend on three facts about each
parameter that its shape cannot reliably tell (Flax and PyTorch lay kernels out differently):
its type, its fan-in and the depth of the residual stack that contains it. Modules of this
library create every parameter through ``umup_param``, which stores them as metadata on the
``nnx.Param``; ``param_info(model)`` reads them back as a tree parallel to
``nnx.state(model, nnx.Param)``, which the Optax transforms and analysis tools consume.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
from flax import nnx

PARAM_TYPES = ("weight", "embedding", "output", "bias", "norm")


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """u-muP metadata of one parameter.

    Attributes:
      type: one of ``PARAM_TYPES``: ``"weight"`` (hidden matmul weight), ``"embedding"``,
        ``"output"`` (readout), ``"bias"`` or ``"norm"`` (normalisation gain).
      fan_in: the number of inputs each output unit sums over (for an embedding: d_model, the
        convention of u-muP's Adam rule; for biases and gains: their size).
      depth: number of layers of the residual stack that contains the parameter, or None
        outside one.
      depth_exponent: the stack's depth exponent ``alpha`` (``TransformerConfig.depth_exponent``):
        each residual branch is weighted ``n_layers^-alpha`` against the embedding and the
        parameter's learning rate gets the factor ``depth^(alpha - 1)``. ``0.5`` is u-muP's
        (depth-muP's) rule, ``1`` CompleteP's (Dey et al., 2025).
    """

    type: str
    fan_in: int
    depth: Optional[int] = None
    depth_exponent: float = 0.5

    def __post_init__(self):
        if self.type not in PARAM_TYPES:
            raise ValueError(f"ParamInfo.type must be one of {PARAM_TYPES}, got {self.type!r}.")
        if int(self.fan_in) < 1:
            raise ValueError(f"ParamInfo.fan_in must be >= 1, got {self.fan_in}.")
        if self.depth is not None and int(self.depth) < 1:
            raise ValueError(f"ParamInfo.depth must be None or >= 1, got {self.depth}.")
        check_depth_exponent(self.depth_exponent, "ParamInfo.depth_exponent")


def check_depth_exponent(alpha: float, name: str = "depth_exponent") -> None:
    """Raises ``ValueError`` unless ``0.5 <= alpha <= 1``: the range over which depth-muP's
    and CompleteP's analyses (Yang et al., 2023; Dey et al., 2025) give feature learning in
    every layer as the depth grows (below 1/2 the residual stream's variance grows with depth).
    """
    if not 0.5 <= float(alpha) <= 1.0:
        raise ValueError(f"{name} must be in [0.5, 1] (0.5: u-muP / depth-muP, 1: CompleteP), "
                         f"got {alpha}.")


def umup_param(value: jax.Array, type: str, fan_in: int, depth: Optional[int] = None,
               depth_exponent: float = 0.5, **metadata: Any) -> nnx.Param:
    """Creates an ``nnx.Param`` tagged with u-muP metadata (validated by ``ParamInfo``).

    Args:
      value: the initial value.
      type: one of ``PARAM_TYPES``.
      fan_in: explicit fan-in (never guessed from the shape).
      depth: residual-stack depth, or None.
      depth_exponent: the stack's depth exponent (``ParamInfo.depth_exponent``).
      **metadata: other ``nnx.Param`` metadata, e.g. ``sharding_names``.

    Returns:
      The parameter.
    """
    info = ParamInfo(type, int(fan_in), None if depth is None else int(depth),
                     float(depth_exponent))
    return nnx.Param(value, mup_type=info.type, fan_in=info.fan_in, depth=info.depth,
                     depth_exponent=info.depth_exponent, **metadata)


def info_of(variable: nnx.Variable) -> Optional[ParamInfo]:
    """The ``ParamInfo`` of one variable, or None if it carries no u-muP metadata."""
    meta = variable.get_metadata()
    if "mup_type" not in meta or "fan_in" not in meta:
        return None
    return ParamInfo(meta["mup_type"], meta["fan_in"], meta.get("depth"),
                     meta.get("depth_exponent", 0.5))


def param_info(model_or_state: Any, *, default: Optional[ParamInfo] = None,
               allow_missing: bool = False) -> nnx.State:
    """The tree of ``ParamInfo`` records parallel to ``nnx.state(model, nnx.Param)``.

    Args:
      model_or_state: an ``nnx.Module`` or an ``nnx.State`` of parameters.
      default: record used for parameters without metadata.
      allow_missing: if True, parameters without metadata (and no ``default``) map to None.

    Returns:
      An ``nnx.State`` with a ``ParamInfo`` (or None) at each parameter's path.

    Raises:
      ValueError: a parameter has no metadata, naming every such parameter.
    """
    state = (nnx.state(model_or_state, nnx.Param)
             if isinstance(model_or_state, nnx.Module) else model_or_state)
    missing = []

    def read(path, var):
        info = info_of(var) if isinstance(var, nnx.Variable) else None
        if info is None:
            info = default
        if info is None and not allow_missing:
            missing.append("/".join(str(getattr(k, "key", k)) for k in path))
        return info

    tree = jax.tree_util.tree_map_with_path(
        read, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if missing:
        raise ValueError(
            f"{len(missing)} parameter(s) carry no u-muP metadata (type, fan_in, depth): "
            f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. Create them with "
            f"unitscale_jax.nn.umup_param, or pass default=ParamInfo(...) / allow_missing=True."
        )
    return tree
