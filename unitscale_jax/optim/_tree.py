"""Tree helpers shared by the Optax transforms: path keys, leaf mapping and ParamInfo lookup.

Updates reach a transform in several shapes: a plain dict pytree, an ``nnx.State`` of raw arrays
(what ``nnx.Optimizer.update`` passes), or an ``nnx.State`` whose leaves are ``nnx.Variable``
wrappers (what ``nnx.state(model)`` returns and ``nnx.Optimizer`` hands to ``init``); wrappers
such as ``optax.masked`` / ``optax.partition`` replace leaves with ``optax.MaskedNode`` and
``None`` marks absent leaves. The helpers here treat variables as leaves (so tree paths stop at
the variable and do not depend on how Flax flattens one), unwrap and re-wrap their values, pass
``None`` and ``MaskedNode`` through, and turn each path into a tuple of strings so that
``DictKey(0)``, ``SequenceKey(0)`` and ``GetAttrKey('0')`` all match.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import optax
from flax import nnx

from unitscale_jax.params import ParamInfo
from unitscale_jax.params import param_info as _param_info

PathKey = Tuple[str, ...]


def is_leaf(x: Any) -> bool:
    """Leaves for our traversals: variables, ``None`` and ``optax.MaskedNode``."""
    return x is None or isinstance(x, (nnx.Variable, optax.MaskedNode))


def is_passthrough(x: Any) -> bool:
    """True for leaves that transforms must return unchanged (``None``, ``MaskedNode``)."""
    return x is None or isinstance(x, optax.MaskedNode)


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_key(path: Tuple[Any, ...]) -> PathKey:
    """Normalises a ``jax.tree_util`` key path to a tuple of strings."""
    return tuple(_key_str(k) for k in path)


def path_str(key: PathKey) -> str:
    return "/".join(key) if key else "<root>"


def value_of(x: Any) -> Any:
    """The raw array of a variable (or ``x`` itself)."""
    return x.get_value() if isinstance(x, nnx.Variable) else x


def map_arrays(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """Maps ``fn(key, array, *rest_arrays)`` over the array leaves of ``tree``.

    Variables in ``tree`` are unwrapped and the result re-wrapped in a copy of the variable
    (metadata kept); variables in ``rest`` are unwrapped. ``None`` and ``MaskedNode`` leaves of
    ``tree`` are returned unchanged.
    """

    def leaf(path, x, *r):
        if is_passthrough(x):
            return x
        key = path_key(path)
        out = fn(key, value_of(x), *(value_of(y) for y in r))
        return x.replace(out) if isinstance(x, nnx.Variable) else out

    return jax.tree_util.tree_map_with_path(leaf, tree, *rest, is_leaf=is_leaf)


def array_keys(tree: Any) -> list:
    """Path keys of the non-passthrough leaves of ``tree``, in flattening order."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
    return [path_key(p) for p, x in flat if not is_passthrough(x)]


class InfoLookup:
    """Finds the ``ParamInfo`` of an update leaf from its tree path.

    A path matches an info entry if the two are equal after normalisation; failing that, if
    exactly one info path is a suffix of the update path (updates nested one level deeper,
    e.g. ``{"params": state}``). Anything else is "missing".

    Args:
      info: ``nnx.State`` / dict of ``ParamInfo`` (as from ``unitscale_jax.nn.param_info``), or an
        ``nnx.Module`` whose ``param_info`` is read.
      default: record used for leaves without metadata.
      allow_missing: if True, leaves without metadata and without ``default`` get ``None``.
    """

    def __init__(self, info: Any, *, default: Optional[ParamInfo] = None,
                 allow_missing: bool = False):
        if isinstance(info, nnx.Module):
            info = _param_info(info, default=default, allow_missing=True)
        if info is None:
            raise ValueError(
                "param_info is None. Pass unitscale_jax.nn.param_info(model) (an nnx.State of "
                "ParamInfo parallel to nnx.state(model, nnx.Param)).")
        flat, _ = jax.tree_util.tree_flatten_with_path(
            info, is_leaf=lambda x: x is None or isinstance(x, (ParamInfo, nnx.Variable)))
        self._table: Dict[PathKey, Optional[ParamInfo]] = {}
        for p, v in flat:
            if isinstance(v, nnx.Variable):
                v = v.get_value()
            if v is not None and not isinstance(v, ParamInfo):
                raise TypeError(
                    f"param_info leaf at {path_str(path_key(p))} is {type(v).__name__}, expected "
                    "ParamInfo or None. Build it with unitscale_jax.nn.param_info(model).")
            self._table[path_key(p)] = v
        self.default = default
        self.allow_missing = allow_missing

    def find(self, key: PathKey) -> Optional[ParamInfo]:
        """The record for ``key``, the default, or None when not found."""
        info = self._table.get(key)
        if info is None and key not in self._table:
            hits = [k for k in self._table if 0 < len(k) < len(key) and key[-len(k):] == k]
            if len(hits) == 1:
                info = self._table[hits[0]]
        return info if info is not None else self.default

    def resolve(self, keys) -> Dict[PathKey, Optional[ParamInfo]]:
        """Records for all ``keys``; raises ValueError naming those without one."""
        out = {k: self.find(k) for k in keys}
        missing = [path_str(k) for k, v in out.items() if v is None]
        if missing and not self.allow_missing:
            raise ValueError(
                f"{len(missing)} parameter(s) have no u-muP metadata (ParamInfo) in param_info: "
                f"{', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}. Create them with "
                "unitscale_jax.nn.umup_param and pass "
                "param_info=unitscale_jax.nn.param_info(model), "
                "or opt in with default=ParamInfo(...) or allow_missing=True (factor 1).")
        return out


def scale_by_info(param_info: Any, factor: Callable[[ParamInfo], float], *,
                  default: Optional[ParamInfo] = None,
                  allow_missing: bool = False) -> optax.GradientTransformationExtraArgs:
    """Multiplies each update leaf by ``factor(its ParamInfo)`` (1 for a leaf without one when
    ``allow_missing``): the body of ``scale_by_umup`` and ``scale_by_mup``.

    The metadata of every parameter is checked at ``init`` and ``update`` (``InfoLookup``);
    leaves whose factor is exactly 1 are passed through untouched.
    """
    lookup = InfoLookup(param_info, default=default, allow_missing=allow_missing)

    def factors_for(tree):
        infos = lookup.resolve(array_keys(tree))
        return {k: 1.0 if i is None else factor(i) for k, i in infos.items()}

    def init_fn(params):
        factors_for(params)  # validates that every parameter has metadata
        return optax.EmptyState()

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        factors = factors_for(updates)
        return map_arrays(lambda k, u: u * factors[k] if factors[k] != 1.0 else u, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
