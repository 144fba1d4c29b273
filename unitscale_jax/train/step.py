"""The sharded train and eval steps: one ``jax.jit`` each over a ``Mesh`` of every device.

The mesh has axes ``("data", "fsdp", "tensor", "stage")``; ``--sharding`` picks the sizes of
the first three and the logical-axis rule table of ``unitscale_jax.nn.sharding``:

====================  ====================  =================================================
``--sharding``        mesh (data, fsdp, tp)  parameters
====================  ====================  =================================================
``dp`` (default)      (N, 1, 1)             replicated; batch split over ``data``
``fsdp``              (1, N, 1)             ``embed`` axis split over ``fsdp``; batch too
``tp``                (N/t, 1, t)           ``heads``/``mlp``/``vocab`` split over ``tensor``
``fsdp_tp``           (1, N/t, t)           both
====================  ====================  =================================================

``--pipeline-stages P`` (default 1) sizes ``stage``, the innermost axis (a process's devices
hold whole pipelines): the stacked layers' ``layers`` axis is split over it and the steps run
the layer stack by ``unitscale_jax.train.pipeline``'s schedule; the table's ``N`` is then the
devices per stage, ``devices / P``.

Parameters, optimizer state and batches are placed with ``NamedSharding``; the model's
activation annotations (``nn.constrain``) take effect because the steps are traced under
``jax.set_mesh(mesh)`` and ``nnx.logical_axis_rules(rules)`` (``Parallel.context``). The
train state is a plain pytree ``{"params", "opt_state", "step", "rng"}`` (``params`` is the
model's ``nnx.Param`` state as a pure dict; ``rng`` is raw PRNG key data, so the state is
checkpointable as is).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unitscale_jax import nn, taps
from unitscale_jax.train import precision
from unitscale_jax.train.build import plateau_scale
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.pipeline import Pipeline, make_schedule
from unitscale_jax.train.tasks import Task

MESH_AXES = ("data", "fsdp", "tensor", "stage")


@dataclasses.dataclass
class Parallel:
    """The device mesh, rule table and the shardings every run needs.

    Attributes:
      mesh: ``Mesh`` with axes ``("data", "fsdp", "tensor", "stage")``.
      rules: logical -> mesh axis rules (``nn.logical_rules(kind, mesh)``; with a pipeline,
        ``layers`` -> ``stage``).
      batch: ``NamedSharding`` of ``[batch, ...]`` arrays (split on the batch axis only).
      replicated: fully replicated ``NamedSharding``.
      batch_shards: how many ways the batch axis is split.
      pipeline: the ``train.pipeline.Pipeline`` run by the steps (None: one stage).
    """

    kind: str
    mesh: jax.sharding.Mesh
    rules: tuple
    batch: NamedSharding
    replicated: NamedSharding
    batch_shards: int
    pipeline: Optional[Pipeline] = None

    @contextlib.contextmanager
    def context(self):
        """Mesh and logical rules active (and the pipeline as the layer stacks' runner):
        trace and run the steps inside this."""
        with jax.set_mesh(self.mesh), nnx.logical_axis_rules(self.rules), \
                nn.stack_runner(self.pipeline):
            yield

    def describe(self) -> str:
        shape = {a: n for a, n in zip(self.mesh.axis_names, self.mesh.devices.shape)
                 if a != "stage" or n > 1}
        kinds = {d.platform for d in self.mesh.devices.flat}
        text = (f"{self.mesh.devices.size} {'/'.join(sorted(kinds))} device(s), sharding "
                f"{self.kind}, mesh {shape}")
        if self.pipeline is not None:
            text += f", {self.pipeline.describe()}"
        return text


def _default_tensor(n: int, divisible: tuple[int, ...]) -> int:
    return max(t for t in range(1, n + 1) if n % t == 0 and all(d % t == 0 for d in divisible))


def make_parallel(kind: str = "dp", *, tensor_parallel: Optional[int] = None,
                  tensor_dims: tuple[int, ...] = (), devices=None,
                  pipeline_stages: int = 1, microbatches: int = 1,
                  pipeline_schedule: str = "gpipe", pipeline_chunks: int = 1) -> Parallel:
    """Builds the mesh for ``--sharding kind`` (and ``--pipeline-stages``).

    Args:
      kind: ``dp``, ``fsdp``, ``tp`` or ``fsdp_tp``.
      tensor_parallel: size of the ``tensor`` axis (tp kinds); default: for ``tp`` the
        largest divisor of the device count that divides every ``tensor_dims`` entry, for
        ``fsdp_tp`` the same capped at 2.
      tensor_dims: sizes split over ``tensor`` (heads, MLP width, vocabulary).
      devices: default ``jax.devices()`` (every device of every process).
      pipeline_stages: size of the ``stage`` axis (``unitscale_jax.train.pipeline``).
      microbatches: microbatches per step of the pipeline.
      pipeline_schedule: ``gpipe`` or ``circular``.
      pipeline_chunks: layer chunks per stage (``circular``).

    Raises:
      UsageError: a tensor-parallel size that does not divide the devices or the dims; a
        stage count that does not divide the devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    stages = int(pipeline_stages)
    if len(devices) % stages:
        raise UsageError(f"--pipeline-stages {stages} does not divide the {len(devices)} "
                         "devices; choose a divisor.")
    n = len(devices) // stages
    if kind in ("dp", "fsdp"):
        if tensor_parallel not in (None, 1):
            raise UsageError(f"--tensor-parallel {tensor_parallel} needs --sharding tp or "
                             f"fsdp_tp (got --sharding {kind}).")
        t = 1
    else:
        t = tensor_parallel or _default_tensor(n, tensor_dims)
        if kind == "fsdp_tp" and not tensor_parallel:
            t = _default_tensor(math.gcd(n, 2), tensor_dims)
        if n % t:
            raise UsageError(f"--tensor-parallel {t} does not divide the {n} devices.")
        bad = [d for d in tensor_dims if d % t]
        if bad:
            raise UsageError(f"--tensor-parallel {t} does not divide the tensor-parallel "
                             f"dimension(s) {bad} (heads, MLP width, vocabulary); choose a "
                             "divisor of all of them.")
    rest = n // t
    shape = ((rest, 1, t) if kind in ("dp", "tp") else (1, rest, t)) + (stages,)
    mesh = jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4,
                         devices=devices)
    rules = nn.logical_rules(kind, mesh)
    pipe = None
    if stages > 1:  # each stage keeps its share of the stacked layers
        rules = tuple((name, "stage" if name == "layers" else axes) for name, axes in rules)
        try:
            pipe = Pipeline(mesh, make_schedule(pipeline_schedule, stages, microbatches,
                                                pipeline_chunks))
        except ValueError as e:
            raise UsageError(f"--pipeline-schedule {pipeline_schedule}: {e}") from None
    spec = nn.logical_to_spec(("batch", None), rules)
    axes = spec[0] if spec and spec[0] is not None else ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    shards = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
    # the batch axis only: the same placement for [batch, length] arrays, and valid for the
    # [batch] arrays of fine-tuning (labels, valid) too
    return Parallel(kind, mesh, rules, NamedSharding(mesh, P(*tuple(spec)[:1])),
                    NamedSharding(mesh, P()), shards, pipe)


# --------------------------------------------------------------------------- shardings

def _fits(spec: P, shape, mesh) -> P:
    """``spec`` with mesh axes dropped from dimensions they do not divide."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
        size = int(np.prod([mesh.shape[a] for a in flat])) if flat else 1
        out.append(axes if shape[i] % size == 0 else None)
    return P(*out)


def param_shardings(abstract_params: nnx.State, par: Parallel) -> dict:
    """``NamedSharding`` of each parameter (pure dict) from its logical axis names."""
    specs = nnx.to_pure_dict(nn.partition_specs(abstract_params, par.rules))
    shapes = nnx.to_pure_dict(abstract_params)
    return jax.tree.map(lambda s, a: NamedSharding(par.mesh, _fits(s, a.shape, par.mesh)),
                        specs, shapes, is_leaf=lambda x: isinstance(x, P))


def state_shardings(tx: optax.GradientTransformation, abstract_state: dict, p_shardings: dict,
                    par: Parallel) -> dict:
    """Shardings of the whole train state: the optimizer-state trees that mirror the
    parameters (Adam's moments, momentum; found by ``optax.tree.map_params``) take the
    parameters' shardings; everything else is replicated."""

    def masked(x):
        return isinstance(x, optax.MaskedNode)

    opt = optax.tree.map_params(tx, lambda a, s: a if masked(a) else s,
                                abstract_state["opt_state"], p_shardings,
                                transform_non_params=lambda _: par.replicated, is_leaf=masked)
    return {"params": p_shardings, "opt_state": opt, "step": par.replicated,
            "rng": par.replicated}


# --------------------------------------------------------------------------- steps

def new_state(params, tx: optax.GradientTransformation, seed: int = 0) -> dict:
    """The train state of ``params`` at step 0: ``{"params", "opt_state", "step", "rng"}``."""
    return {"params": params, "opt_state": tx.init(params), "step": jnp.int32(0),
            "rng": jax.random.key_data(jax.random.key(seed))}


def make_train_step(graphdef, task: Task, tx: optax.GradientTransformation,
                    schedule: Callable, *, use_value: bool,
                    loss_scale: Optional[float] = None, activations: bool = False,
                    axis_name: Optional[str] = None, unit_scaled: bool = False) -> Callable:
    """``train_step(state, batch) -> (state, metrics)`` (not jitted).

    With ``loss_scale`` S the step differentiates ``S * loss`` and divides the gradients by
    S (``unitscale_jax.train.precision``); ``tx`` must then come from ``build_optimizer``
    (which skips steps with non-finite gradients) and the metrics carry ``skipped_steps``.
    A ``teacher`` entry of the state (frozen parameters: ``tasks.Distillation``) reaches the
    task through ``Task.bind`` and is returned unchanged. With ``activations`` the metrics
    carry ``activations``: every value the model taps
    (``unitscale_jax.taps.capture_activations``) in the step's forward pass.

    With ``axis_name`` the step runs on one device's rows under ``jax.pmap`` over that axis
    (``unitscale_jax.train.pmap_step``): each device folds its axis index into the dropout key,
    and the loss and gradients are combined over the axis into those of the whole batch
    (``reduce_over_axis``; ``unit_scaled``: the model's parametrization is, which changes how
    gradients add up) before the optimizer, so every device applies the same update.
    """

    def train_step(state, batch):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if axis_name is not None:  # this device's own dropout masks
            key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
        bound = task.bind(state["teacher"]) if "teacher" in state else task

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            if not activations:
                return bound.loss(model, batch, key)
            with taps.capture_activations() as cap:
                loss, count = bound.loss(model, batch, key)
            return loss, (count, cap.values)

        scaled = precision.scale_loss(loss_fn, loss_scale)
        (_, (loss, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(state["params"])
        count, acts = aux if activations else (aux, None)
        grads = precision.unscale_grads(grads, loss_scale)
        if axis_name is not None:
            loss, count, grads = reduce_over_axis(axis_name, loss, count, grads,
                                                  unit_scaled=unit_scaled)
        extra = {"value": loss} if use_value else {}
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"], **extra)
        params = optax.apply_updates(state["params"], updates)
        lr = jnp.asarray(schedule(state["step"]), jnp.float32) * plateau_scale(opt_state)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "lr": lr,
                   "scored_tokens": count}
        if loss_scale is not None:
            metrics["skipped_steps"] = precision.skipped_steps(opt_state)
        if activations:
            metrics["activations"] = acts
        new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1,
               "rng": state["rng"]}
        if "teacher" in state:  # a distillation teacher: frozen, passed through
            new["teacher"] = state["teacher"]
        return new, metrics

    return train_step


def reduce_over_axis(axis_name: str, loss: jax.Array, count: jax.Array, grads: Any, *,
                     unit_scaled: bool = False) -> tuple[jax.Array, jax.Array, Any]:
    """One device's ``(mean loss, items scored, gradients)`` of its equal share of a batch
    -> those of the whole batch, over the devices of ``axis_name`` (inside ``jax.pmap``).

    The loss is the mean over every scored item: each device's weighted by its ``count``
    (``jax.lax.psum``). Standard-parametrization gradients are those of that mean, so they
    combine the same way (``jax.lax.pmean`` when the counts are equal). Unit-scaled
    gradients (``unit_scaled``; ``unitscale_jax.ops``) are sums over the batch's items times
    ``1/sqrt(rows)`` (the loss has no ``1/B`` in its backward pass, each weight gradient a
    ``batch^-1/2``), so the whole batch's is the devices' sum over ``sqrt(devices)``
    whatever the counts. Either way the result is what one device computing the whole
    batch gets, up to float rounding.
    """
    total = jax.lax.psum(count, axis_name)
    weight = count.astype(jnp.float32) / jnp.maximum(total, 1).astype(jnp.float32)

    def mean(x):
        return jax.lax.psum(x * weight.astype(x.dtype), axis_name)

    if unit_scaled:
        devices = jax.lax.psum(1, axis_name)
        grads = jax.tree.map(lambda g: jax.lax.psum(g, axis_name) * devices ** -0.5, grads)
    else:
        grads = jax.tree.map(mean, grads)
    return mean(loss), total, grads


def make_eval_step(graphdef, task: Task) -> Callable:
    """``eval_step(params, batch) -> {name: (sum, count)}`` (``task.eval_sums``) in eval
    mode."""

    def eval_step(params, batch):
        model = nnx.merge(graphdef, params)
        model.eval()
        return task.eval_sums(model, batch)

    return eval_step


def jit_steps(train_step, eval_step, shardings: dict, par: Parallel, *, donate: bool):
    """The two steps under ``jax.jit`` with explicit in/out shardings."""
    train = jax.jit(train_step, in_shardings=(shardings, par.batch),
                    out_shardings=(shardings, par.replicated),
                    donate_argnums=(0,) if donate else ())
    evaluate = jax.jit(eval_step, in_shardings=(shardings["params"], par.batch),
                       out_shardings=par.replicated)
    return train, evaluate


def process_rows(par: Parallel, batch_size: int) -> list[tuple[int, int]]:
    """The rows ``[start, stop)`` of a ``batch_size`` batch that each process's devices hold
    (in process order; processes in one tensor-parallel group hold the same rows).

    Raises:
      UsageError: a process whose devices hold rows that are not one contiguous range.
    """
    blocks: dict[int, set] = {}
    for device, index in par.batch.devices_indices_map((batch_size,)).items():
        rows = index[0]
        blocks.setdefault(device.process_index, set()).add(
            (rows.start or 0, batch_size if rows.stop is None else rows.stop))
    out = []
    for p in sorted(blocks):
        ranges = sorted(blocks[p])
        if any(a[1] != b[0] and a != b for a, b in zip(ranges, ranges[1:])):
            raise UsageError(f"process {p} holds the batch rows {ranges}, not one contiguous "
                             f"range ({par.describe()}); use another --sharding.")
        out.append((ranges[0][0], ranges[-1][1]))
    return out


def put_batch(batch: dict, par: Parallel) -> dict:
    """This process's rows of a batch -> global arrays sharded over the batch axis (the
    processes of a tensor-parallel group give the same rows)."""
    blocks = {(idx[0].start, idx[0].stop) for idx in par.batch.addressable_devices_indices_map(
        (par.batch_shards,)).values()}  # this process's blocks of the batch axis
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        rows = v.shape[0] // len(blocks) * par.batch_shards
        out[k] = jax.make_array_from_process_local_data(par.batch, v, (rows, *v.shape[1:]))
    return out
