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
