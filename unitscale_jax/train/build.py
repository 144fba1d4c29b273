"""Model, objective and optimizer from a ``Config`` (the in-process API the experiments use).

``build_model(cfg, vocab_size)`` makes the ``unitscale_jax.nn`` model; ``build_optimizer(cfg,
param_info)`` the Optax transform and learning-rate schedule: u-muP runs get
``unitscale_jax.optim``'s optimizers (per-tensor u-muP factors from ``param_info``,
independent weight decay), SP runs get plain ``optax`` ones. ``TASKS`` maps the model kind to
its data objective and loss.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unitscale_jax import nn, optim
from unitscale_jax.train.config import Config
from unitscale_jax.train.errors import UsageError
from unitscale_jax.train.precision import guard_optimizer, precision_setup


def transformer_config(cfg: Config, vocab_size: int) -> nn.TransformerConfig:
    """The ``TransformerConfig`` of a run (vocabulary from the tokenizer, length from data)."""
    m, d = cfg.model, cfg.data
    prec = precision_setup(cfg.training.precision)
    max_len = d.seq_len
    if m.kind == "encdec":
        from unitscale_jax.data import seq2seq_target_len
        max_len = max(max_len, seq2seq_target_len(d.seq_len, d.noise_density, d.mean_span))
    try:
        return nn.TransformerConfig(
            vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
            d_head=m.d_head, ffn_mult=m.ffn_mult, max_seq_len=max_len, mlp=m.mlp, norm=m.norm,
            parametric_norm=m.parametric_norm, bias=m.bias, dropout=m.dropout,
            rope=bool(m.rope), attn_mult=m.attn_mult, act_mult=m.act_mult,
            residual_mult=m.residual_mult, residual_attn_ratio=m.residual_attn_ratio,
            loss_mult=m.loss_mult, parametrization=m.parametrization,
            sp_init_std=m.sp_init_std, dtype=prec.dtype, precision=prec.policy,
            scan_layers=m.scan_layers, remat=m.remat, n_decoder_layers=m.n_decoder_layers)
    except ValueError as e:
        raise UsageError(str(e)) from None


# --------------------------------------------------------------------------- objectives

def _lm_loss(model, batch, rng):
    """Next-token cross-entropy over scored targets (``ops.cross_entropy`` in u-muP)."""
    c = model.config
    logits = model(batch["inputs"], rng=rng)
    where = batch["where"]
    loss = c.parametrization.cross_entropy(logits, batch["targets"], mult=c.loss_mult,
                                where=where)
    return loss, jnp.sum(where)


def _mlm_loss(model, batch, rng):
    """Masked-LM cross-entropy over the selected positions (``TransformerEncoder.mlm_loss``)."""
    loss = model.mlm_loss(batch["ids"], batch["labels"], batch["where"], mask=batch["valid"],
                          rng=rng)
    return loss, jnp.sum(batch["where"])


def _seq2seq_loss(model, batch, rng):
    """Span-corruption cross-entropy of the decoder targets given the corrupted source."""
    c = model.config
    logits = model(batch["encoder_ids"], batch["decoder_input_ids"],
                   src_mask=batch["encoder_mask"], rng=rng)
    where = batch["decoder_where"]
    loss = c.parametrization.cross_entropy(logits, batch["decoder_target_ids"],
                                           mult=c.loss_mult, where=where)
    return loss, jnp.sum(where)


@dataclasses.dataclass(frozen=True)
class Task:
    """A model kind's data objective (``make_iterator(task=...)``) and loss.

    ``loss(model, batch, rng) -> (mean loss over scored tokens, number scored)``.
    """

    data_task: str
    loss: Callable[..., tuple[jax.Array, jax.Array]]
    model_class: Callable[[], type]


def _model_class(name: str) -> Callable[[], type]:
    def get():
        cls = getattr(nn, name, None)
        if cls is None:
            raise UsageError(f"this version of unitscale_jax.nn has no {name}; use --model "
                             "decoder.")
        return cls
    return get


TASKS: dict[str, Task] = {
    "decoder": Task("lm", _lm_loss, _model_class("TransformerDecoder")),
    "encoder": Task("mlm", _mlm_loss, _model_class("TransformerEncoder")),
    "encdec": Task("seq2seq", _seq2seq_loss, _model_class("TransformerEncoderDecoder")),
}


def get_task(kind: str) -> Task:
    if kind not in TASKS:
        raise UsageError(f"--model {kind} is not available in this version; choose one of "
                         f"{', '.join(TASKS)}.")
    return TASKS[kind]


def build_model(cfg: Config, vocab_size: int, *, seed: Optional[int] = None) -> nnx.Module:
    """The model of ``cfg`` with parameters initialised from ``seed`` (default the run's)."""
    task = get_task(cfg.model.kind)
    seed = cfg.training.seed if seed is None else seed
    return task.model_class()(transformer_config(cfg, vocab_size), rngs=nnx.Rngs(seed))


# --------------------------------------------------------------------------- optimizers

def _with_warmup(schedule: Callable, peak: float, warmup: int) -> Callable:
    if warmup > 0:
        ramp = optax.linear_schedule(0.0, peak, warmup)
        schedule = optax.join_schedules([ramp, schedule], [warmup])

    def fn(count):
        return schedule(count)

    fn.peak_value = float(peak)
    return fn


def build_schedule(cfg: Config) -> Callable[[Any], Any]:
    """The learning-rate schedule ``step -> eta_t`` (with a ``peak_value`` attribute).

    ``constant`` and ``plateau``: linear warmup then ``lr``; ``warmup_cosine``: warmup then a
    cosine to ``lr * end_lr_fraction`` at the last step; ``exponential``: warmup then
    ``lr * gamma^t`` with ``gamma`` reaching ``end_lr_fraction`` at the last step.
    """
    o, steps = cfg.optimizer, cfg.training.steps
    lr, warmup = float(o.lr), int(o.warmup_steps)
    if o.schedule == "warmup_cosine":
        return optim.warmup_cosine(lr, warmup, steps, end_value=lr * o.end_lr_fraction)
    if o.schedule == "exponential":
        gamma = o.end_lr_fraction ** (1.0 / max(steps - warmup, 1))
        return _with_warmup(optim.exponential_decay(lr, gamma), lr, warmup)
    return _with_warmup(optax.constant_schedule(lr), lr, warmup)


def _matrices(params):
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def build_optimizer(cfg: Config, param_info: Any) -> tuple[optax.GradientTransformation,
                                                            Callable]:
    """The optimizer of ``cfg`` and its schedule.

    Args:
      cfg: a resolved config (``unitscale_jax.train.config.resolve``).
      param_info: ``unitscale_jax.nn.param_info(model)`` (u-muP only; may be a pure dict).

    Returns:
      ``(tx, schedule)``. ``tx.update`` needs ``value=loss`` when the schedule is
      ``plateau`` (``needs_value(cfg)``). With ``--loss-scale`` the whole chain skips steps
      whose gradients are not finite (``train.precision.guard_optimizer``).
    """
    o, umup = cfg.optimizer, cfg.model.parametrization == "umup"
    schedule = build_schedule(cfg)
    if umup:
        if o.name == "sgd":
            core = optim.sgd(schedule, param_info=param_info, momentum=o.momentum,
                             weight_decay=o.weight_decay)
        else:
            core = getattr(optim, o.name)(schedule, param_info=param_info, b1=o.b1, b2=o.b2,
                                          eps=o.eps, weight_decay=o.weight_decay)
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
        parts.append(optim.reduce_on_plateau(o.plateau_factor, o.plateau_patience,
                                             accumulation_size=o.plateau_accumulation))
    return guard_optimizer(optax.chain(*parts), cfg.training.loss_scale), schedule


def needs_value(cfg: Config) -> bool:
    """Whether ``tx.update`` takes ``value=loss`` (the plateau schedule)."""
    return cfg.optimizer.schedule == "plateau"


def plateau_scale(opt_state: Any) -> jax.Array:
    """The reduce-on-plateau multiplier in ``opt_state`` (1.0 without one)."""
    found = [s.scale for s in jax.tree.leaves(
        opt_state, is_leaf=lambda x: hasattr(x, "scale") and hasattr(x, "best_value"))
        if hasattr(s, "best_value")]
    return found[0] if found else jnp.float32(1.0)
