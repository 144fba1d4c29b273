"""Learning-rate schedules for the u-muP optimizers.

Any optax schedule (``step -> eta_t``) works as ``learning_rate``; the ones here carry a
``peak_value`` attribute, which the independent weight decay uses as ``eta_peak``.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import optax


def _with_peak(schedule, peak: float):
    def fn(count):
        return schedule(count)

    fn.peak_value = float(peak)
    fn.__doc__ = schedule.__doc__
    return fn


def warmup_cosine(peak_value: float, warmup_steps: int, total_steps: int, *,
                  init_value: float = 0.0, end_value: float = 0.0) -> optax.Schedule:
    """Linear warmup then cosine decay.

    ``eta_t = init + (peak - init) t / W`` for ``t < W`` (``W = warmup_steps``), then
    ``eta_t = end + (peak - end) (1 + cos(pi (t - W) / (T - W))) / 2`` for ``W <= t <= T``
    (``T = total_steps``) and ``end`` after ``T``.

    Args:
      peak_value: the learning rate at the end of warmup (``eta_peak``).
      warmup_steps: ``W >= 0``.
      total_steps: ``T > W``: the step at which the cosine reaches ``end_value``.
      init_value: the learning rate at step 0.
      end_value: the final learning rate.

    Returns:
      A schedule with attribute ``peak_value``.
    """
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(
            f"warmup_cosine needs 0 <= warmup_steps < total_steps, got {warmup_steps}, "
            f"{total_steps}.")
    sched = optax.warmup_cosine_decay_schedule(
        init_value=init_value, peak_value=peak_value, warmup_steps=warmup_steps,
        decay_steps=total_steps, end_value=end_value)
    return _with_peak(sched, max(peak_value, init_value, end_value))


def exponential_decay(init_value: float, decay_rate: float, *,
                      end_value: Optional[float] = None) -> optax.Schedule:
    """Exponential decay ``eta_t = eta_0 * lambda^t`` (per step, no staircase).

    Args:
      init_value: ``eta_0``.
      decay_rate: ``lambda > 0`` (< 1 to decay).
      end_value: optional floor (for ``lambda < 1``) or ceiling (``lambda > 1``).

    Returns:
      A schedule with attribute ``peak_value`` (``eta_0`` when decaying).
    """
    if not decay_rate > 0:
        raise ValueError(f"exponential_decay needs decay_rate > 0, got {decay_rate}.")
    if decay_rate > 1 and end_value is None:
        raise ValueError("exponential_decay with decay_rate > 1 grows without bound: "
                         "pass end_value.")
    lo_hi = (None if end_value is None else
             (min(init_value, end_value), max(init_value, end_value)))

    def sched(count):
        eta = init_value * jnp.power(jnp.asarray(decay_rate, jnp.float32),
                                     jnp.asarray(count, jnp.float32))
        return eta if lo_hi is None else jnp.clip(eta, *lo_hi)

    return _with_peak(sched, init_value if decay_rate <= 1 else end_value)


def reduce_on_plateau(factor: float = 0.1, patience: int = 10, *, rtol: float = 1e-4,
                      atol: float = 0.0, cooldown: int = 0, accumulation_size: int = 1,
                      min_scale: float = 0.0) -> optax.GradientTransformationExtraArgs:
    """Multiplies updates by a scale that drops by ``factor`` when the loss plateaus.

    This is ``optax.contrib.reduce_on_plateau``; put it *last* in a chain with a u-muP
    optimizer (``optax.chain(adamw(...), reduce_on_plateau())``) and pass the loss each step:
    ``tx.update(grads, state, params, value=loss)``. It scales the whole update, the
    independent weight decay included, which is what a lower ``eta_t`` does.

    Args:
      factor: multiplier applied to the scale on a plateau.
      patience: number of (accumulated) evaluations without improvement before reducing.
      rtol: relative improvement threshold.
      atol: absolute improvement threshold.
      cooldown: evaluations to wait after a reduction.
      accumulation_size: losses averaged per evaluation.
      min_scale: lower bound of the scale.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` needing ``value=`` in ``update``.
    """
    return optax.contrib.reduce_on_plateau(
        factor=factor, patience=patience, rtol=rtol, atol=atol, cooldown=cooldown,
        accumulation_size=accumulation_size, min_scale=min_scale)
