"""Scale tracking: statistics of every op output, its gradient, every weight and its gradient.

One forward and backward pass of a model of ``unitscale_jax.nn`` with the activation taps
of ``unitscale_jax.nn.hooks`` switched on. A tap at an op's output adds a zero
"perturbation" ``p``: ``y' = y + p``; the gradient of the loss with respect to ``p`` is the
gradient flowing into ``y`` in the backward pass (for a u-muP model, the *scaled* gradient
that unit scaling keeps near 1). Weight gradients are the gradients of the same loss with
respect to the ``nnx.Param`` s. ``scale_stats`` computes all statistics
(``analysis.stats.tensor_stats``) inside one traceable function, so it works under
``jax.jit`` / ``nnx.jit`` and only scalars leave it; ``track_scales`` runs it as two jitted
programs (the pass, then the statistics), which XLA compiles several times faster.

Taps inside ``jax.lax.scan`` are skipped, so models built with ``scan_layers=True`` are first
copied into an unrolled model with the same parameter values (``unroll``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.analysis import naming
from unitscale_jax.analysis.activations import tapped_value_and_grad
from unitscale_jax.analysis.stats import FORMATS, stat_names, tensor_stats

KINDS = ("fwd", "bwd", "weight", "weight_grad")
LossFn = Callable[[nnx.Module, Any], jax.Array]


def default_loss(model: nnx.Module, batch: Any) -> jax.Array:
    """``model.loss(**batch)`` for a dict batch, else ``model.loss(batch)``."""
    if not callable(getattr(model, "loss", None)):
        raise TypeError(f"{type(model).__name__} has no loss method; "
                        "pass loss_fn=(model, batch) -> scalar.")
    return model.loss(**batch) if isinstance(batch, dict) else model.loss(batch)


def unroll(model: nnx.Module) -> nnx.Module:
    """The model itself, or, if its config has ``scan_layers=True``, an unrolled copy.

    The copy is ``type(model)(config.replace(scan_layers=False), rngs=...)`` built abstractly
    (``nnx.eval_shape``) and filled with ``model``'s variables; a scanned variable (path
    ``(..., "layers", ...)`` with a leading layer axis) gives layer ``i`` its slice ``i``.
    """
    config = getattr(model, "config", None)
    if config is None or not getattr(config, "scan_layers", False):
        return model
    new = nnx.eval_shape(lambda: type(model)(config.replace(scan_layers=False), rngs=nnx.Rngs(0)))
    src = {path: var for path, var in nnx.to_flat_state(nnx.state(model))}
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(new)):
        value = _scanned_value(src, path)
        if value is None:
            raise ValueError(f"unroll: no variable of the scanned {type(model).__name__} matches "
                             f"{'.'.join(map(str, path))}; "
                             "build it with scan_layers=False instead.")
        flat.append((path, var.replace(value)))
    nnx.update(new, nnx.from_flat_state(flat))
    flags = [m.deterministic for _, m in nnx.iter_modules(model) if hasattr(m, "deterministic")]
    if flags and all(flags):
        new.eval()
    return new


def _scanned_value(src: dict, path: tuple) -> Optional[jax.Array]:
    if path in src:
        return src[path].get_value()
    for j in range(len(path) - 1):
        if path[j] == "layers" and isinstance(path[j + 1], int):
            var = src.get(path[:j + 1] + path[j + 2:])
            if var is not None:
                return var.get_value()[path[j + 1]]
    return None


def forward_backward(model: nnx.Module, batch: Any, loss_fn: LossFn = default_loss
                     ) -> tuple[jax.Array, dict, dict, nnx.State, nnx.State]:
    """One forward and backward pass with taps on (traceable).

    Returns:
      ``(loss, activations, activation_grads, params, param_grads)``: the first two are dicts
      keyed by tap key (``"<order>.<tap>"``), the gradients being those flowing into each
      tapped op output; the last two are ``nnx.State`` s of the ``nnx.Param`` s.
    """
    loss, acts, g_acts, params, g_params = tapped_value_and_grad(loss_fn, model, batch)
    if not acts:
        raise ValueError("scale_stats: the forward pass recorded no taps; the model must call "
                         "unitscale_jax.nn.tap outside jax.lax.scan (use unroll(model)).")
    loss = jnp.asarray(loss, jnp.float32)
    return loss, acts, g_acts, params, g_params


def stats_of(acts: dict, g_acts: dict, params: nnx.State, g_params: nnx.State,
             formats=FORMATS) -> dict:
    """``tensor_stats`` of ``forward_backward``'s tensors: ``{kind: {name: stats}}``."""

    def of_state(tree):
        return {".".join(map(str, path)): tensor_stats(v.get_value(), formats)
                for path, v in nnx.to_flat_state(tree)
                if jnp.issubdtype(v.get_value().dtype, jnp.floating)}

    return {
        "fwd": {k: tensor_stats(v, formats) for k, v in acts.items()},
        "bwd": {k: tensor_stats(v, formats) for k, v in g_acts.items()},
        "weight": of_state(params),
        "weight_grad": of_state(g_params),
    }


def scale_stats(model: nnx.Module, batch: Any, loss_fn: LossFn = default_loss,
                formats=FORMATS) -> tuple[jax.Array, dict]:
    """Loss and statistics of one forward and backward pass (traceable: use under ``jit``).

    Pass an unrolled model (see ``unroll``): taps inside a scanned stack record nothing.

    Args:
      model: an ``nnx.Module`` whose forward pass calls ``unitscale_jax.nn.tap``.
      batch: the loss function's input.
      loss_fn: ``(model, batch) -> scalar loss`` (default ``model.loss(batch)``).
      formats: formats whose underflow / saturation fractions are measured.

    Returns:
      ``(loss, stats)`` with ``stats[kind][name] = tensor_stats(...)`` for ``kind`` in
      ``KINDS``: ``fwd`` / ``bwd`` keyed by tap key (``"<order>.<tap>"``), ``weight`` /
      ``weight_grad`` keyed by ``"."``-joined parameter path.
    """
    loss, acts, g_acts, params, g_params = forward_backward(model, batch, loss_fn)
    return loss, stats_of(acts, g_acts, params, g_params, formats)


def to_records(stats: dict, formats=FORMATS) -> list[dict]:
    """Flattens ``scale_stats``'s statistics into rows (see ``track_scales``)."""
    ops = list(stats["fwd"])
    op_display = dict(zip(ops, naming.op_names(ops)))
    weights = list(stats["weight"])
    w_display = {w: naming.param_name(w.split(".")) for w in weights}
    order = naming.row_order([op_display[k] for k in ops], [w_display[w] for w in weights])
    index = {name: i for i, name in enumerate(order)}
    records = []
    for kind in KINDS:
        display = op_display if kind in ("fwd", "bwd") else w_display
        for key, s in stats[kind].items():
            rec = {"index": index[display[key]], "name": display[key], "kind": kind, "key": key}
            rec.update({k: float(s[k]) for k in stat_names(formats)})
            records.append(rec)
    records.sort(key=lambda r: (r["index"], KINDS.index(r["kind"])))
    return records


def track_scales(model: nnx.Module, batch: Any, loss_fn: LossFn = default_loss, *,
                 jit: bool = True, formats=FORMATS) -> list[dict]:
    """Scale statistics of every op output, op-output gradient, weight and weight gradient.

    Example::

        model = TransformerDecoder(vocab_size=256, d_model=128, n_layers=2, n_heads=4,
                                   rngs=nnx.Rngs(0))
        ids = jax.random.randint(jax.random.key(1), (8, 64), 0, 256)
        records = track_scales(model, ids)
        plot_scales(records, "scales.png"); write_csv(records, "scales.csv")

    Args:
      model: a model of ``unitscale_jax.nn`` (u-muP, SP or muP; scanned stacks are unrolled).
      batch: input of ``loss_fn`` (token ids ``[batch, seq]`` for ``TransformerDecoder``).
      loss_fn: ``(model, batch) -> scalar``; default ``model.loss(batch)``.
      jit: compile the pass (``jax.jit``); False runs it op by op.
      formats: formats whose underflow / saturation fractions are measured.

    Returns:
      A list of dicts, one per tensor and kind, sorted by row (forward order, each weight just
      before the op it feeds): ``index`` (row), ``name`` (display name, e.g.
      ``"L0.mlp.up"``), ``kind`` (``"fwd"`` op output, ``"bwd"`` gradient flowing into it,
      ``"weight"``, ``"weight_grad"``), ``key`` (tap key or parameter path), then the
      ``stat_names(formats)`` floats, and ``loss`` (the pass's loss, the same in every row).
    """
    model = unroll(model)
    graphdef, state = nnx.split(model)

    def fwd_bwd(state, batch):
        return forward_backward(nnx.merge(graphdef, state), batch, loss_fn)

    def stats(loss, *tensors):
        return loss, stats_of(*tensors, formats=formats)

    # two programs: XLA compiles them several times faster than the fused one
    if jit:
        fwd_bwd, stats = jax.jit(fwd_bwd), jax.jit(stats)
    loss, stats = stats(*fwd_bwd(state, batch))
    records = to_records(jax.device_get(stats), formats)
    for r in records:
        r["loss"] = float(loss)
    return records
