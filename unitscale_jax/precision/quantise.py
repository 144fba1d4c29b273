"""Differentiable quantisation ops: a format on the forward value or on the gradient only.

These mirror the reference library's ``FPFormat.quantise_fwd`` / ``quantise_bwd``
(``unit_scaling.formats``), which its ``simulate_format`` transform inserts around every
matmul: ``quantise_fwd`` on the matmul inputs (activations and weights, E4M3 for FP8) and
``quantise_bwd`` on the matmul output, so that the gradient entering the backward matmuls is
rounded to the backward format (E5M2 for FP8).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax

from unitscale_jax.precision.formats import FloatFormat, get_format
from unitscale_jax.precision.simulate import Rounding, check_float_input, check_rounding, simulate

FormatLike = Union[FloatFormat, str, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantise_fwd(x, rng, fmt, rounding):
    return simulate(x, fmt, rounding=rounding, rng=rng)


def _quantise_fwd_fwd(x, rng, fmt, rounding):
    return simulate(x, fmt, rounding=rounding, rng=rng), None


def _quantise_fwd_bwd(fmt, rounding, _, g):
    del fmt, rounding
    return g, None


_quantise_fwd.defvjp(_quantise_fwd_fwd, _quantise_fwd_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _quantise_bwd(x, rng, fmt, rounding):
    del rng, fmt, rounding
    return x


def _quantise_bwd_fwd(x, rng, fmt, rounding):
    del fmt, rounding
    return x, rng


def _quantise_bwd_bwd(fmt, rounding, rng, g):
    return simulate(g, fmt, rounding=rounding, rng=rng), None


_quantise_bwd.defvjp(_quantise_bwd_fwd, _quantise_bwd_bwd)


def _prepare(x, fmt, rounding, rng, op):
    x = check_float_input(x, op)
    check_rounding(rounding, rng, op)
    fmt = None if fmt is None else get_format(fmt)
    if fmt is not None and fmt.is_float32:
        fmt = None
    return x, fmt


def quantise_fwd(
    x: jax.Array,
    fmt: FormatLike,
    *,
    rounding: Rounding = "nearest",
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Rounds ``x`` to ``fmt`` in the forward pass; the gradient passes straight through.

    ``y = simulate(x, fmt)``; ``dL/dx = dL/dy`` (straight-through estimator).

    Args:
      x: float32/bfloat16/float16 array.
      fmt: a ``FloatFormat``, its name, or None (identity).
      rounding: ``"nearest"`` or ``"stochastic"``.
      rng: ``jax.random`` key, required for stochastic rounding.

    Returns:
      The rounded ``x`` (same shape and dtype).
    """
    x, fmt = _prepare(x, fmt, rounding, rng, "quantise_fwd")
    if fmt is None:
        return x
    return _quantise_fwd(x, rng, fmt, rounding)


def quantise_bwd(
    x: jax.Array,
    fmt: FormatLike,
    *,
    rounding: Rounding = "nearest",
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """Identity in the forward pass; rounds the gradient to ``fmt``.

    ``y = x``; ``dL/dx = simulate(dL/dy, fmt)``.

    Args:
      x: float32/bfloat16/float16 array.
      fmt: a ``FloatFormat``, its name, or None (identity).
      rounding: ``"nearest"`` or ``"stochastic"`` (applied to the gradient).
      rng: ``jax.random`` key, required for stochastic rounding.

    Returns:
      ``x`` unchanged, whose gradient will be rounded to ``fmt``.
    """
    x, fmt = _prepare(x, fmt, rounding, rng, "quantise_bwd")
    if fmt is None:
        return x
    return _quantise_bwd(x, rng, fmt, rounding)


def quantise(
    x: jax.Array,
    fwd_fmt: FormatLike,
    bwd_fmt: FormatLike,
    *,
    rounding: Rounding = "nearest",
    rng: Optional[jax.Array] = None,
) -> jax.Array:
    """``quantise_bwd(quantise_fwd(x, fwd_fmt), bwd_fmt)``: value in ``fwd_fmt``, gradient in
    ``bwd_fmt``. With stochastic rounding ``rng`` is split into one key per direction."""
    check_rounding(rounding, rng, "quantise")
    rng_f = rng_b = None
    if rng is not None:
        rng_f, rng_b = jax.random.split(rng)
    x = quantise_fwd(x, fwd_fmt, rounding=rounding, rng=rng_f)
    return quantise_bwd(x, bwd_fmt, rounding=rounding, rng=rng_b)
