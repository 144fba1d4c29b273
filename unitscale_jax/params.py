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
    """

    type: str
    fan_in: int
    depth: Optional[int] = None

    def __post_init__(self):
        if self.type not in PARAM_TYPES:
            raise ValueError(f"ParamInfo.type must be one of {PARAM_TYPES}, got {self.type!r}.")
        if int(self.fan_in) < 1:
            raise ValueError(f"ParamInfo.fan_in must be >= 1, got {self.fan_in}.")
        if self.depth is not None and int(self.depth) < 1:
            raise ValueError(f"ParamInfo.depth must be None or >= 1, got {self.depth}.")


def umup_param(value: jax.Array, type: str, fan_in: int, depth: Optional[int] = None,
               **metadata: Any) -> nnx.Param:
    """Creates an ``nnx.Param`` tagged with u-muP metadata (validated by ``ParamInfo``).

    Args:
      value: the initial value.
      type: one of ``PARAM_TYPES``.
      fan_in: explicit fan-in (never guessed from the shape).
      depth: residual-stack depth, or None.
      **metadata: other ``nnx.Param`` metadata, e.g. ``sharding_names``.

    Returns:
      The parameter.
    """
    info = ParamInfo(type, int(fan_in), None if depth is None else int(depth))
    return nnx.Param(value, mup_type=info.type, fan_in=info.fan_in, depth=info.depth, **metadata)


def info_of(variable: nnx.Variable) -> Optional[ParamInfo]:
    """The ``ParamInfo`` of one variable, or None if it carries no u-muP metadata."""
    meta = variable.get_metadata()
    if "mup_type" not in meta or "fan_in" not in meta:
        return None
    return ParamInfo(meta["mup_type"], meta["fan_in"], meta.get("depth"))


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
