"""Model and optimizer from a ``Config`` (the in-process API the experiments use).

``build_model(cfg, vocab_size)`` makes the ``unitscale_jax.nn`` model of the run's task
(``unitscale_jax.train.tasks``); ``build_optimizer(cfg, param_info)`` the Optax transform and
learning-rate schedule: u-muP runs get ``unitscale_jax.optim``'s optimizers (per-tensor u-muP
factors from ``param_info``, independent weight decay relative to the peak learning rate
``--lr``), muP runs ``unitscale_jax.optim.mup_adam(w)`` (hidden weights at
``--mup-base-fan-in / fan_in`` of ``--lr``), SP runs plain ``optax`` ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unitscale_jax import nn, optim
from unitscale_jax.train.config import Config, ModelConfig
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.precision import guard_optimizer, precision_setup
from unitscale_jax.train.tasks import TASKS, Task, get_task

__all__ = ["TASKS", "Task", "get_task", "transformer_config", "build_model", "build_schedule",
           "build_optimizer", "needs_value", "plateau_scale", "uses_lora", "train_only",
           "model_optimizer"]

SHARED_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig)
                      if f.name in {g.name for g in dataclasses.fields(nn.TransformerConfig)})
"""``ModelConfig`` fields passed to ``TransformerConfig`` as they are."""


def transformer_config(cfg: Config, vocab_size: int) -> nn.TransformerConfig:
    """The ``TransformerConfig`` of a run (vocabulary from the tokenizer, length from data).

    Raises:
      UsageError: a model setting ``TransformerConfig`` rejects (its message).
    """
    m = cfg.model
    prec = precision_setup(cfg.training.precision)
    shared = {name: getattr(m, name) for name in SHARED_FIELDS}
    try:
        return nn.TransformerConfig(
            **{**shared, "rope": bool(m.rope)}, vocab_size=vocab_size,
            max_seq_len=get_task(m.kind).max_seq_len(cfg.data.seq_len, cfg.data),
            dtype=prec.dtype, precision=prec.policy)
    except ValueError as e:
        raise UsageError(str(e)) from None


def build_model(cfg: Config, vocab_size: int, *, seed: Optional[int] = None,
                task: Optional[Task] = None) -> nnx.Module:
    """The model of ``cfg`` with parameters initialised from ``seed`` (default the run's);
    ``task`` (default ``--model``'s) makes it (``Task.make_model``: a fine-tuning task adds
    its heads)."""
    seed = cfg.training.seed if seed is None else seed
    task = get_task(cfg.model.kind) if task is None else task
    return task.make_model(transformer_config(cfg, vocab_size), nnx.Rngs(seed))


# --------------------------------------------------------------------------- optimizers

def build_schedule(cfg: Config) -> optax.Schedule:
    """The learning-rate schedule ``step -> eta_t`` (an optax schedule peaking at ``lr``).

    ``constant`` and ``plateau``: linear warmup then ``lr``; ``warmup_cosine``: warmup then a
    cosine to ``lr * end_lr_fraction`` at the last step; ``exponential``: warmup then
    ``lr * gamma^t`` with ``gamma`` reaching ``end_lr_fraction`` at the last step.
    """
    o, steps = cfg.optimizer, cfg.training.steps
    lr, warmup = float(o.lr), int(o.warmup_steps)
    if o.schedule == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps,
                                                  end_value=lr * o.end_lr_fraction)
    if o.schedule == "exponential":
        gamma = o.end_lr_fraction ** (1.0 / max(steps - warmup, 1))
        schedule = optax.exponential_decay(lr, 1, gamma)
    else:
        schedule = optax.constant_schedule(lr)
    if warmup == 0:
        return schedule
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), schedule], [warmup])


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(cfg: Config, param_info: Any) -> tuple[optax.GradientTransformation,
                                                            optax.Schedule]:
    """The optimizer of ``cfg`` and its schedule.

    Args:
      cfg: a resolved config (``unitscale_jax.train.config.resolve``).
      param_info: ``unitscale_jax.nn.param_info(model)`` (u-muP and muP only; may be a pure
        dict).

    Returns:
      ``(tx, schedule)``. ``tx.update`` needs ``value=loss`` when the schedule is
      ``plateau`` (``needs_value(cfg)``). With ``--loss-scale`` the whole chain skips steps
      whose gradients are not finite (``train.precision.guard_optimizer``).
    """
    o = cfg.optimizer
    schedule = build_schedule(cfg)
    parametrization = nn.get_parametrization(cfg.model.parametrization)
    if parametrization.unit_scaled:
        kw = dict(param_info=param_info, weight_decay=o.weight_decay,
                  peak_learning_rate=float(o.lr))
        core = (optim.sgd(schedule, momentum=o.momentum, **kw) if o.name == "sgd" else
                getattr(optim, o.name)(schedule, b1=o.b1, b2=o.b2, eps=o.eps, **kw))
    elif isinstance(parametrization, nn.MuP):  # adam or adamw (config.validate)
        core = optim.mup_adamw(schedule, param_info=param_info, base_fan_in=o.mup_base_fan_in,
                               b1=o.b1, b2=o.b2, eps=o.eps,
                               weight_decay=o.weight_decay if o.name == "adamw" else 0.0)
    elif o.name == "adamw":
        core = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=_matrices)
    else:
        core = (optax.adam(schedule, b1=o.b1, b2=o.b2, eps=o.eps) if o.name == "adam" else
                optax.sgd(schedule, momentum=o.momentum))
        if o.weight_decay:
            core = optax.chain(optax.add_decayed_weights(o.weight_decay, _matrices), core)
    parts = []
    if o.grad_clip is not None:
        parts.append(optax.clip_by_global_norm(o.grad_clip))
    if o.unit_scale_grads:
        parts.append(optim.unit_scale())
    parts.append(core)
    if o.schedule == "plateau":
        parts.append(optax.contrib.reduce_on_plateau(
            o.plateau_factor, o.plateau_patience, accumulation_size=o.plateau_accumulation))
    return guard_optimizer(optax.chain(*parts), cfg.training.loss_scale), schedule


def uses_lora(cfg: Config) -> bool:
    """Whether the run's model has LoRA adapters (``--lora-targets``): then only the adapters
    (and a fine-tuning run's heads) train."""
    return cfg.model.lora_targets is not None and bool(
        nn.lora.parse_lora_targets(cfg.model.lora_targets))


def train_only(tx: optax.GradientTransformation, labels: Any) -> optax.GradientTransformation:
    """``tx`` on the leaves labelled ``"train"``; the ``"frozen"`` ones get zero updates and no
    optimizer state (``optax.partition`` with ``optax.set_to_zero``)."""
    return optax.partition({"train": tx, "frozen": optax.set_to_zero()}, labels)


def model_optimizer(cfg: Config, abstract_model: nnx.Module
                    ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``build_optimizer`` for a model (its ``param_info``); with LoRA adapters only they
    train (``nn.lora.trainable_labels``, ``train_only``)."""
    tx, schedule = build_optimizer(cfg, nnx.to_pure_dict(nn.param_info(abstract_model)))
    if uses_lora(cfg):
        params = nnx.to_pure_dict(nnx.state(abstract_model, nnx.Param))
        tx = train_only(tx, nn.lora.trainable_labels(params))
    return tx, schedule


def needs_value(cfg: Config) -> bool:
    """Whether ``tx.update`` takes ``value=loss`` (the plateau schedule)."""
    return cfg.optimizer.schedule == "plateau"


def plateau_scale(opt_state: Any) -> jax.Array:
    """The reduce-on-plateau multiplier in ``opt_state`` (1.0 without one)."""
    state = optax.contrib.ReduceLROnPlateauState
    found = [s.scale for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, state))
             if isinstance(s, state)]
    return found[0] if found else jnp.float32(1.0)
