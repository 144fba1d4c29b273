"""The ``jax.pmap`` data-parallel train step, for training loops written around ``pmap``.

The trainer's own path is one ``jax.jit`` over a ``Mesh`` (``unitscale_jax.train.step``,
``--sharding dp|fsdp|tp|fsdp_tp``); this module gives code built on ``pmap`` the same step:
the same model, task loss, u-muP optimizers (``unitscale_jax.optim``, with
``unit_scale()`` under ``--unit-scale-grads``), schedule and loss scaling, built by
``unitscale_jax.train.build`` and ``step.make_train_step``. Inside ``pmap`` each device
computes the loss and gradients of its rows, the gradients are combined over the mapped axis
into the whole batch's (``step.reduce_over_axis``: for SP the mean weighted by the items each
device scores, ``jax.lax.pmean`` when they score equally many; for u-muP, whose unit-scaled
gradients are sums scaled by ``1/sqrt(rows)``, ``jax.lax.psum / sqrt(devices)``) and every
device applies the same optimizer update, so the replicas stay identical and the updates are
those of the ``jit`` step. The train state has the classic ``pmap`` layout: every leaf
stacked along a leading device axis (``replicate`` / ``unreplicate``), batches split along it
(``shard_batch``)::

    from unitscale_jax import train
    from unitscale_jax.train import pmap_step
    from unitscale_jax.train.data import load_data

    cfg = train.resolve(train.get_preset("tiny"))
    data = load_data(cfg)
    step, state, graphdef = pmap_step.make_pmap_train_step(cfg, data.vocab_size)
    batches = data.train_iterator(cfg)
    for _ in range(cfg.training.steps):
        state, metrics = step(state, pmap_step.shard_batch(next(batches)))
    model = pmap_step.model_of(graphdef, state)

On several hosts (``jax.distributed``) each process passes the state replicated over its
local devices and its own rows (``data.train_iterator(cfg, shard_index=jax.process_index(),
shard_count=jax.process_count())``); the ``psum`` spans every device of every process
(what ``pmap`` documents; the tests here run one process with 8 devices).
``jit`` with a mesh remains the recommended path (see the training guide): JAX documents
``pmap`` as the old way of parallel mapping, superseded by ``jax.shard_map`` and ``jit``
with shardings (on which it is now implemented), and only the mesh path shards parameters
and optimizer state (fsdp, tp).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unitscale_jax import nn
from unitscale_jax.train import build
from unitscale_jax.train import step as steplib
from unitscale_jax.train.config import Config
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.tasks import Task

AXIS = "batch"
"""The axis name of the ``pmap`` (what the gradients are averaged over)."""


class PmapTraining(NamedTuple):
    """What ``make_pmap_train_step`` returns.

    Attributes:
      step: the pmapped ``step(state, batch) -> (state, metrics)``; ``state`` and ``batch``
        carry a leading device axis, and so do the metrics (the same on every device).
      state: the initial train state, replicated (``{"params", "opt_state", "step",
        "rng"}``, each leaf ``[devices, ...]``).
      graphdef: the model's ``nnx`` graph definition (``model_of`` rebuilds the model).
    """

    step: Callable
    state: dict
    graphdef: Any


def _local(devices: Optional[Sequence[Any]]) -> list:
    """This process's devices among ``devices`` (default all of its devices)."""
    if devices is None:
        return jax.local_devices()
    return [d for d in devices if d.process_index == jax.process_index()]


def pmap_train_step(graphdef: Any, task: Task, tx: optax.GradientTransformation,
                    schedule: Callable, *, unit_scaled: bool, use_value: bool = False,
                    loss_scale: Optional[float] = None, axis_name: str = AXIS,
                    devices: Optional[Sequence[Any]] = None, donate: bool = False) -> Callable:
    """The train step of ``step.make_train_step`` under ``jax.pmap`` over ``axis_name``.

    Args:
      graphdef: the model's graph definition (``nnx.split(model, nnx.Param)[0]``).
      task: what the model learns (``unitscale_jax.train.tasks``; its ``loss``).
      tx: the optimizer (``build.build_optimizer`` / ``build.model_optimizer``).
      schedule: its learning-rate schedule (reported in the metrics).
      unit_scaled: the model is unit-scaled (u-muP: ``nn.get_parametrization(name)
        .unit_scaled``), which decides how the devices' gradients combine
        (``step.reduce_over_axis``).
      use_value: ``tx.update`` takes ``value=loss`` (``build.needs_value``: the plateau
        schedule).
      loss_scale: the static loss scale (``--loss-scale``), or None.
      axis_name: the name of the mapped axis.
      devices: the devices mapped over (``jax.pmap``'s ``devices``: those of every process;
        default every device).
      donate: donate the input state's buffers to the output (not on the CPU).

    Returns:
      ``step(state, batch) -> (state, metrics)`` with a leading device axis on every input
      and output leaf.
    """
    train_step = steplib.make_train_step(graphdef, task, tx, schedule, use_value=use_value,
                                         loss_scale=loss_scale, axis_name=axis_name,
                                         unit_scaled=unit_scaled)
    return jax.pmap(train_step, axis_name=axis_name, devices=devices,
                    donate_argnums=(0,) if donate else ())


def make_pmap_train_step(cfg: Config, vocab_size: int, *, task: Optional[Task] = None,
                         devices: Optional[Sequence[Any]] = None,
                         donate: bool = False) -> PmapTraining:
    """The pmapped train step of a config and its replicated initial state.

    The model (``build.build_model``), optimizer (``build.model_optimizer``: u-muP's for
    ``--parametrization umup``, with ``unit_scale()`` first under ``--unit-scale-grads``) and
    initial state (``trainer.init_state_fn``, the seed of ``--seed``) are the ``Trainer``'s;
    so are the updates, up to float rounding of the sums over devices.

    Args:
      cfg: the run's config (resolved here, ``train.config.resolve``).
      vocab_size: the tokenizer's vocabulary size (``train.data.load_data(cfg).vocab_size``).
      task: what the model learns (default ``--model``'s task).
      devices: the devices mapped over (those of every process; default every device); the
        state is replicated over this process's.
      donate: donate the state's buffers to each step's output (not on the CPU).

    Returns:
      ``PmapTraining(step, state, graphdef)``.

    Raises:
      UsageError: a bad config (``train.config.resolve``), or one the ``pmap`` path does not
        run: ``--sharding`` other than ``dp``, ``--distill-from``, LoRA adapters.
    """
    from unitscale_jax.train.config import resolve
    from unitscale_jax.train.trainer import init_state_fn

    cfg = resolve(cfg)
    t = cfg.training
    unsupported = [flag for flag, used in (
        (f"--sharding {t.sharding}", t.sharding != "dp"),
        ("--distill-from", bool(t.distill_from)),
        ("--lora-targets", build.uses_lora(cfg))) if used]
    if unsupported:
        raise UsageError(f"the pmap train step is data parallel only and does not run "
                         f"{', '.join(unsupported)}; use the Trainer (jit over a mesh) for "
                         "those.")
    task = build.get_task(cfg.model.kind) if task is None else task
    abstract_model = nnx.eval_shape(lambda: build.build_model(cfg, vocab_size, task=task))
    graphdef = nnx.split(abstract_model, nnx.Param)[0]
    tx, schedule = build.model_optimizer(cfg, abstract_model)
    state = jax.jit(init_state_fn(cfg, vocab_size, tx, task=task))()
    unit_scaled = nn.get_parametrization(cfg.model.parametrization).unit_scaled
    step = pmap_train_step(graphdef, task, tx, schedule, unit_scaled=unit_scaled,
                           use_value=build.needs_value(cfg), loss_scale=t.loss_scale,
                           devices=devices, donate=donate)
    return PmapTraining(step, replicate(state, _local(devices)), graphdef)


def replicate(tree: Any, devices: Optional[Sequence[Any]] = None) -> Any:
    """One copy of every leaf of ``tree`` per device: leaves ``[len(devices), ...]``, entry
    ``i`` on ``devices[i]`` (default ``jax.local_devices()``)."""
    devices = _local(devices) if devices is None else list(devices)
    sharding = NamedSharding(jax.sharding.Mesh(np.array(devices), (AXIS,)), P(AXIS))
    host = jax.device_get(tree)
    return jax.tree.map(
        lambda a: jax.device_put(np.broadcast_to(a, (len(devices),) + np.shape(a)), sharding),
        host)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of every leaf of a replicated tree (``replicate``)."""
    return jax.tree.map(lambda a: a[0], tree)


def shard_batch(batch: dict, n_devices: Optional[int] = None) -> dict:
    """A batch ``{name: [rows, ...]}`` split into ``{name: [n_devices, rows / n_devices,
    ...]}`` (default ``jax.local_device_count()``): device ``i`` gets the ``i``-th block of
    rows, as the mesh path's batch sharding does.

    Raises:
      UsageError: the rows do not divide into ``n_devices`` equal parts.
    """
    n = jax.local_device_count() if n_devices is None else n_devices
    out = {}
    for name, value in batch.items():
        a = np.asarray(value)
        if a.ndim == 0 or a.shape[0] % n:
            raise UsageError(f"batch entry {name!r} of shape {a.shape} does not split into {n} "
                             f"equal parts along its rows (one per device); use a batch size "
                             f"that is a multiple of {n}.")
        out[name] = a.reshape((n, a.shape[0] // n) + a.shape[1:])
    return out


def model_of(graphdef: Any, state: dict) -> nnx.Module:
    """The model with the first device's parameters of a replicated ``state``."""
    return nnx.merge(graphdef, unreplicate(state)["params"])
