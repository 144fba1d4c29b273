"""Logical sharding axis names and the default logical -> mesh rule tables.

Every parameter of ``unitscale_jax.nn`` carries logical axis names as its ``out_sharding``
metadata (Flax NNX's sharding annotation), and activations are annotated with
``constrain(x, names)``. Logical names:

  ``batch``, ``sequence``, ``embed`` (d_model), ``heads`` (attention heads; flat
  ``heads * head_dim`` projection axes too), ``kv`` (head_dim), ``mlp`` (MLP hidden),
  ``vocab`` (vocabulary or classes), ``layers`` (the stacked-layer axis of scanned stacks).

A trainer maps them to mesh axes with a rule table, without touching the modules::

    mesh = jax.make_mesh((2, 4), ("data", "tensor"))
    rules = logical_rules("tp", mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
        specs = partition_specs(model)            # PartitionSpecs of nnx.state(model, nnx.Param)
        ...                                       # jit with NamedSharding(mesh, spec)

Tables (mesh axes ``data``, ``fsdp``, ``tensor``; axes absent from the mesh are dropped by
``logical_rules(kind, mesh)``):

  ``dp``: batch over ``data``; parameters replicated.
  ``fsdp``: batch over ``(data, fsdp)``; parameters sharded over ``fsdp`` on their
    ``embed`` axis.
  ``tp``: batch over ``data``; ``heads``, ``mlp`` and ``vocab`` over ``tensor`` (Megatron
    style: column-parallel up / qkv projections, row-parallel down / out projections).
  ``fsdp_tp``: both.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
from flax import nnx
from flax.core import spmd as core_spmd
from jax.sharding import PartitionSpec

LOGICAL_AXES = ("batch", "sequence", "embed", "heads", "kv", "mlp", "vocab", "layers")

_NONE = (("sequence", None), ("kv", None), ("layers", None))
LOGICAL_RULES: dict[str, tuple] = {
    "dp": (("batch", "data"), ("embed", None), ("heads", None), ("mlp", None),
           ("vocab", None)) + _NONE,
    "fsdp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", None), ("mlp", None),
             ("vocab", None)) + _NONE,
    "tp": (("batch", "data"), ("embed", None), ("heads", "tensor"), ("mlp", "tensor"),
           ("vocab", "tensor")) + _NONE,
    "fsdp_tp": (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("heads", "tensor"),
                ("mlp", "tensor"), ("vocab", "tensor")) + _NONE,
}


def logical_rules(kind: str = "dp", mesh: Optional[jax.sharding.Mesh] = None) -> tuple:
    """A default rule table, with mesh axes that ``mesh`` lacks replaced by replication.

    Args:
      kind: ``"dp"``, ``"fsdp"``, ``"tp"`` or ``"fsdp_tp"``.
      mesh: optional mesh (or abstract mesh) whose axis names are kept.

    Returns:
      A tuple of ``(logical_name, mesh_axes)`` pairs, usable with ``nnx.logical_axis_rules``.
    """
    if kind not in LOGICAL_RULES:
        raise ValueError(f"unknown sharding rule table {kind!r}; "
                         f"choose one of {sorted(LOGICAL_RULES)}.")
    rules = LOGICAL_RULES[kind]
    if mesh is None:
        return rules
    names = set(mesh.axis_names)

    def keep(axes):
        if axes is None:
            return None
        if isinstance(axes, str):
            return axes if axes in names else None
        kept = tuple(a for a in axes if a in names)
        return kept[0] if len(kept) == 1 else (kept or None)

    return tuple((name, keep(axes)) for name, axes in rules)


def logical_to_spec(names: Sequence[Optional[str]],
                    rules: Optional[Sequence] = None) -> PartitionSpec:
    """Maps logical axis names to a ``PartitionSpec``; a mesh axis is used at most once.

    Args:
      names: one logical name (or None) per array axis.
      rules: rule table; default the active ``nnx.logical_axis_rules``.

    Returns:
      The ``PartitionSpec`` (later axes that would reuse a mesh axis are replicated).
    """
    rules = dict(core_spmd.get_logical_axis_rules() if rules is None else rules)
    used: set = set()
    out = []
    for name in names:
        axes = rules.get(name) if name is not None else None
        if name is not None and name not in rules and name not in LOGICAL_AXES:
            raise ValueError(f"logical axis {name!r} has no rule; known axes: {LOGICAL_AXES}.")
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        if any(a in used for a in flat):
            flat = ()
        used.update(flat)
        out.append(None if not flat else (flat[0] if len(flat) == 1 else flat))
    return PartitionSpec(*out)


def _active_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh is None or mesh.empty else mesh


def constrain(x: jax.Array, names: Sequence[Optional[str]]) -> jax.Array:
    """Annotates activation ``x`` with logical axis names.

    A no-op unless a mesh is active (``jax.set_mesh``) and logical rules are set
    (``nnx.logical_axis_rules``); then ``jax.lax.with_sharding_constraint`` with the mapped
    spec.
    """
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} axis names {tuple(names)} for an array of shape "
                         f"{x.shape}.")
    rules = core_spmd.get_logical_axis_rules()
    if not rules or _active_mesh() is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules))


def param_metadata(names: Sequence[Optional[str]]) -> dict:
    """``nnx.Param`` metadata carrying logical axis names.

    Parameters are sharded eagerly at creation only when a mesh and logical rules are both
    active; otherwise the names are just recorded for the trainer.
    """
    eager = bool(core_spmd.get_logical_axis_rules()) and _active_mesh() is not None
    return {"out_sharding": tuple(names), "eager_sharding": eager}


def partition_specs(model_or_state: Any, rules: Optional[Sequence] = None) -> Any:
    """PartitionSpecs of a model's parameters (tree parallel to ``nnx.state(model, nnx.Param)``).

    Args:
      model_or_state: an ``nnx.Module`` or a parameter ``nnx.State``.
      rules: rule table; default the active ``nnx.logical_axis_rules``.

    Returns:
      An ``nnx.State`` of ``PartitionSpec`` leaves (``PartitionSpec()`` for unannotated ones).
    """
    state = (nnx.state(model_or_state, nnx.Param)
             if isinstance(model_or_state, nnx.Module) else model_or_state)

    def spec(var):
        names = var.get_metadata().get("out_sharding") if isinstance(var, nnx.Variable) else None
        return logical_to_spec(names, rules) if names else PartitionSpec()

    return jax.tree.map(spec, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
