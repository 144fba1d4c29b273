"""Unit-scaled losses: the value is the ordinary mean, the gradient is unit-scale."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from unitscale_jax.ops import plain
from unitscale_jax.ops._checks import check_ce_inputs, check_kl_inputs, require_float
from unitscale_jax.ops._scale import scale_bwd, scale_fwd
from unitscale_jax.ops.activations import _check_mult


@jax.custom_vjp
def _divide_fwd_only(x, n):
    return x / n


def _divide_fwd_only_fwd(x, n):
    return x / n, n


def _divide_fwd_only_bwd(n, g):
    return g, jnp.zeros_like(n)


_divide_fwd_only.defvjp(_divide_fwd_only_fwd, _divide_fwd_only_bwd)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    mult: float = 1.0,
    where: Optional[jax.Array] = None,
    check_ids: bool = False,
) -> jax.Array:
    """Unit-scaled softmax cross-entropy, averaged over the (valid) positions.

    Scaling rule (u-muP, Blake et al., 2025; ``unit_scaling.functional.cross_entropy``): the
    loss value is the ordinary mean of ``-log softmax(mult * logits)[label]``, but the
    gradient sent to the logits is ``(softmax(mult * x) - onehot) * V / sqrt(V - 1)`` per
    position: no ``1/B`` from the mean and no ``mult`` factor. With ``V`` classes, the
    residual ``softmax - onehot`` has std ``sqrt(V - 1) / V`` at init. Each position's loss is
    ``logsumexp(x) - x[label]`` (``ops.plain.token_nll``): no log-probabilities are
    materialised.

    Args:
      logits: ``[..., V]``.
      labels: integer ``[...]``.
      mult: u-muP's ``alpha_loss-softmax``.
      where: optional boolean ``[...]``; False positions add nothing to the value or the
        gradient, and the mean is over True positions only.
      check_ids: raise if a (valid) label is outside ``[0, V)``.

    Returns:
      A scalar float32 loss.
    """
    op = "cross_entropy"
    where = check_ce_inputs(logits, labels, where, check_ids, op)
    mult = _check_mult(mult, op)
    vocab = logits.shape[-1]
    x = scale_fwd(scale_bwd(logits, vocab / (vocab - 1) ** 0.5), mult)
    nll = plain.token_nll(x, labels)
    if where is None:
        return scale_fwd(jnp.sum(nll), 1.0 / max(nll.size, 1))
    count = jnp.maximum(jnp.sum(where), 1).astype(jnp.float32)
    return _divide_fwd_only(jnp.sum(jnp.where(where, nll, 0.0)), count)


def kl_divergence(
    logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float = 1.0,
    mult: float = 1.0,
    where: Optional[jax.Array] = None,
) -> jax.Array:
    """Unit-scaled knowledge-distillation loss, averaged over the (valid) positions.

    The value is the ordinary ``T^2 * KL(softmax(t / T) || softmax(mult * s / T))`` (Hinton
    et al., 2015; ``ops.plain.kl_divergence`` of ``mult * s``), with ``s`` the student's
    ``logits`` and ``t`` the teacher's. Scaling rule: ``cross_entropy``'s. The gradient sent to
    the student's logits is ``(softmax(mult * s / T) - softmax(t / T)) * V / sqrt(V - 1)`` per
    position: no ``1/B`` from the mean, no ``mult / T`` from the softmax's input and no
    ``T^2``. Relative to the unscaled reference (the gradient of the value), ``beta = B * V /
    (sqrt(V - 1) * T * mult)`` with ``B`` the positions counted.

    Why it is unit scale at init: a student at init predicts a near-uniform ``p_s``, so each
    position's residual is ``u - p_t``. Its squared norm is largest, ``(V - 1) / V``, for a
    one-hot teacher (exactly ``cross_entropy``'s ``u - onehot``, whose std over the ``V``
    classes is ``sqrt(V - 1) / V``), so the scaled gradient has std 1 for a confident teacher
    and less for a softer one; never more. With a one-hot teacher the op *is*
    ``cross_entropy``: the value is ``T^2 * cross_entropy(s, labels, mult=mult / T)`` and the
    gradient the same. The teacher's logits get no gradient.

    Args:
      logits: the student's ``[..., V]``.
      teacher_logits: the teacher's ``[..., V]``, as its softmax reads them (its own loss
        multiplier applied).
      temperature: ``T > 0``, a static Python number.
      mult: the student's u-muP ``alpha_loss-softmax``.
      where: optional boolean ``[...]``; False positions add nothing to the value or the
        gradient, and the mean is over True positions only.

    Returns:
      A scalar float32 loss.
    """
    op = "kl_divergence"
    where, t = check_kl_inputs(logits, teacher_logits, where, temperature, op)
    mult = _check_mult(mult, op)
    vocab = logits.shape[-1]
    x = scale_fwd(scale_bwd(logits, vocab / (vocab - 1) ** 0.5), mult / t)
    kl = plain.token_kl(x, teacher_logits.astype(jnp.float32) / t)
    if where is None:
        return scale_fwd(jnp.sum(kl), t * t / max(kl.size, 1))
    count = jnp.maximum(jnp.sum(where), 1).astype(jnp.float32)
    return scale_fwd(_divide_fwd_only(jnp.sum(jnp.where(where, kl, 0.0)), count), t * t)


def mse_loss(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Unit-scaled mean squared error.

    Scaling rule (Blake et al., 2023, table A.2): the value is the ordinary mean of
    ``(pred - target)^2``; the gradient of each input is that of the *sum*, times
    ``8^-1/2``, so it has unit std when ``pred`` and ``target`` are independent and unit.

    Args:
      pred: predictions.
      target: targets of the same shape.

    Returns:
      A scalar loss.
    """
    require_float(pred, "pred", "mse_loss")
    require_float(target, "target", "mse_loss")
    if pred.shape != target.shape:
        raise ValueError("mse_loss: pred and target must have the same shape, "
                         f"got {pred.shape} and {target.shape}.")
    s = 8 ** -0.5
    pred, target = scale_bwd(pred, s), scale_bwd(target, s)
    return scale_fwd(jnp.sum(jnp.square(pred - target)), 1.0 / max(pred.size, 1))
