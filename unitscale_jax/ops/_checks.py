"""Trace-time input validation shared by the ops: clear errors instead of silent broadcasting."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def require_float(x, name: str, op: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{op}: {name} must be a floating-point array, got dtype {dtype}.")


def require_int(x, name: str, op: str) -> None:
    dtype = jnp.result_type(x)
    if not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"{op}: {name} must be integer token ids, got dtype {dtype}; "
            f"cast with .astype(jnp.int32) if the values are whole numbers."
        )


def require_min_rank(x, rank: int, name: str, op: str) -> None:
    if np.ndim(x) < rank:
        raise ValueError(f"{op}: {name} must have rank >= {rank}, got shape {np.shape(x)}.")


def require_rank(x, rank: int, name: str, op: str) -> None:
    if np.ndim(x) != rank:
        raise ValueError(f"{op}: {name} must have rank {rank}, got shape {np.shape(x)}.")


def require_range_rate(rate: float, op: str) -> float:
    rate = float(rate)
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{op}: dropout rate must be in [0, 1), got {rate}.")
    return rate


def _raise_out_of_range(lo, hi, size, name: str, op: str) -> None:
    lo, hi = int(lo), int(hi)
    if size > 0 and (lo < 0 or hi >= size):
        raise ValueError(
            f"{op}: {name} out of range: found values in [{lo}, {hi}] but valid ids are "
            f"[0, {size - 1}]. JAX would silently clamp them; fix the tokenizer or the "
            f"vocabulary size."
        )


def check_ids_in_range(ids: jax.Array, size: int, name: str, op: str, where=None) -> None:
    """Raises if any id (where ``where`` is True) lies outside ``[0, size)``.

    Eager inputs raise ``ValueError`` at once. Under ``jax.jit`` the check runs on the host
    through ``jax.debug.callback`` and the error surfaces when the computation executes.
    """
    if where is not None:
        ids = jnp.where(where, ids, 0)
    if ids.size == 0:
        return
    lo, hi = jnp.min(ids), jnp.max(ids)
    if isinstance(lo, jax.core.Tracer) or isinstance(hi, jax.core.Tracer):
        jax.debug.callback(
            lambda a, b: _raise_out_of_range(a, b, size, name, op), lo, hi
        )
    else:
        _raise_out_of_range(lo, hi, size, name, op)


def check_linear_inputs(x, kernel, bias, op: str) -> None:
    """``x[..., fan_in]``, ``kernel[fan_in, fan_out]`` (Flax layout), ``bias[fan_out]``."""
    require_float(x, "x", op)
    require_float(kernel, "kernel", op)
    require_min_rank(x, 1, "x", op)
    require_rank(kernel, 2, "kernel", op)
    fan_in, fan_out = kernel.shape
    if x.shape[-1] != fan_in:
        raise ValueError(
            f"{op}: kernel fan-in {fan_in} (kernel shape {kernel.shape}, layout [fan_in, "
            f"fan_out]) does not match the last axis of x (shape {x.shape}). A PyTorch "
            f"weight [out, in] must be transposed."
        )
    if bias is not None:
        require_float(bias, "bias", op)
        if bias.shape != (fan_out,):
            raise ValueError(f"{op}: bias must have shape ({fan_out},), got {bias.shape}.")


def check_ce_inputs(logits, labels, where, check_ids: bool, op: str):
    """Validates cross-entropy inputs; returns ``where`` as a boolean array (or None)."""
    require_float(logits, "logits", op)
    require_min_rank(logits, 1, "logits", op)
    require_int(labels, "labels", op)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"{op}: labels shape {labels.shape} must equal logits shape without the class "
            f"axis, {logits.shape[:-1]}."
        )
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_ or where.shape != labels.shape:
            raise ValueError(f"{op}: where must be boolean with labels' shape {labels.shape}, "
                             f"got {where.dtype}{where.shape}.")
    vocab = logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"{op}: need at least 2 classes, got {vocab}.")
    if check_ids:
        check_ids_in_range(labels, vocab, "labels", op, where=where)
    return where


def check_kl_inputs(logits, teacher_logits, where, temperature, op: str):
    """Validates distillation-KL inputs; returns ``(where, temperature)`` (boolean array or
    None, a positive Python float)."""
    require_float(logits, "logits", op)
    require_float(teacher_logits, "teacher_logits", op)
    require_min_rank(logits, 1, "logits", op)
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"{op}: teacher_logits shape {teacher_logits.shape} must equal logits "
                         f"shape {logits.shape} (the same positions and vocabulary).")
    if logits.shape[-1] < 2:
        raise ValueError(f"{op}: need at least 2 classes, got {logits.shape[-1]}.")
    if isinstance(temperature, jax.Array) or not isinstance(temperature, (int, float)):
        raise TypeError(f"{op}: temperature must be a static Python number, got "
                        f"{type(temperature).__name__}.")
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{op}: temperature must be a finite number > 0, got {temperature}.")
    if where is not None:
        where = jnp.asarray(where)
        if where.dtype != jnp.bool_ or where.shape != logits.shape[:-1]:
            raise ValueError(f"{op}: where must be boolean with shape {logits.shape[:-1]}, "
                             f"got {where.dtype}{where.shape}.")
    return where, temperature
