"""The two scaling primitives every unit-scaled op is built from.

A unit-scaled op is ``scale_fwd(f(scale_bwd(x, beta)), alpha)``: ``alpha`` multiplies the
forward output and ``beta`` the gradient sent back to ``x``. Both are Python floats computed
from static shapes (Blake et al., "Unit Scaling", ICML 2023, section 4).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Iterator

import jax
import jax.numpy as jnp

_ROW_MULTIPLE: contextvars.ContextVar = contextvars.ContextVar("unitscale_jax.ops.microbatches",
                                                               default=1)


@contextlib.contextmanager
def microbatches(m: int) -> Iterator[None]:
    """Ops traced inside see one of ``m`` equal microbatches of the batch: the parameter
    gradient scales that count the rows a gradient sums over (``linear``'s kernel and bias,
    the norms' gain and bias: ``B^-1/2``) count ``m`` times the rows they see, so the ``m``
    microbatch gradients sum to the whole batch's (pipeline parallelism)."""
    if int(m) < 1:
        raise ValueError(f"microbatches: m must be >= 1, got {m}.")
    token = _ROW_MULTIPLE.set(int(m) * _ROW_MULTIPLE.get())
    try:
        yield
    finally:
        _ROW_MULTIPLE.reset(token)


def row_multiple() -> int:
    """The rows of the whole batch per row an op sees (``microbatches``; 1 outside)."""
    return _ROW_MULTIPLE.get()


def _check_scale(scale: float, name: str) -> float:
    if isinstance(scale, jax.Array):
        raise TypeError(
            f"{name}: scale must be a static Python float computed from shapes, got a "
            f"traced array of shape {scale.shape}; unit scaling never measures at run time."
        )
    return float(scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_fwd(x, scale):
    return x * scale


def _scale_fwd_fwd(x, scale):
    # The forward rule must return the *scaled* primal, or value_and_grad sees s=1.
    return x * scale, None


def _scale_fwd_bwd(scale, _, g):
    del scale
    return (g,)


_scale_fwd.defvjp(_scale_fwd_fwd, _scale_fwd_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _scale_bwd(x, scale):
    del scale
    return x


def _scale_bwd_fwd(x, scale):
    del scale
    return x, None


def _scale_bwd_bwd(scale, _, g):
    return (g * scale,)


_scale_bwd.defvjp(_scale_bwd_fwd, _scale_bwd_bwd)


def scale_fwd(x: jax.Array, scale: float) -> jax.Array:
    """Multiplies ``x`` by ``scale`` in the forward pass only.

    Scaling rule: ``y = scale * x``; ``dL/dx = dL/dy`` (the gradient is not scaled).

    Args:
      x: any floating-point array; its dtype is kept.
      scale: a static Python float.

    Returns:
      ``scale * x``, with the gradient of the identity.
    """
    scale = _check_scale(scale, "scale_fwd")
    if scale == 1.0:
        return x
    return _scale_fwd(x, scale)


def scale_bwd(x: jax.Array, scale: float) -> jax.Array:
    """Identity in the forward pass; multiplies the gradient by ``scale``.

    Scaling rule: ``y = x``; ``dL/dx = scale * dL/dy``.

    Args:
      x: any floating-point array; its dtype is kept.
      scale: a static Python float.

    Returns:
      ``x`` unchanged, whose gradient will be multiplied by ``scale``.
    """
    scale = _check_scale(scale, "scale_bwd")
    if scale == 1.0:
        return x
    return _scale_bwd(x, scale)


# Scales carried by an array: a per-layer constant (u-muP's residual tau) that reaches the
# body of a scanned layer stack as an element of a constant array instead of a Python float.
# The values are still fixed by the configuration, never measured; the scale gets no gradient.
@jax.custom_vjp
def _scale_fwd_array(x, s):
    return x * s.astype(x.dtype)


def _scale_fwd_array_fwd(x, s):
    return x * s.astype(x.dtype), s


def _scale_fwd_array_bwd(s, g):
    return g, jnp.zeros_like(s)


_scale_fwd_array.defvjp(_scale_fwd_array_fwd, _scale_fwd_array_bwd)


@jax.custom_vjp
def _scale_bwd_array(x, s):
    del s
    return x


def _scale_bwd_array_fwd(x, s):
    return x, s


def _scale_bwd_array_bwd(s, g):
    return g * s.astype(g.dtype), jnp.zeros_like(s)


_scale_bwd_array.defvjp(_scale_bwd_array_fwd, _scale_bwd_array_bwd)


def is_static(scale) -> bool:
    """Whether ``scale`` is a Python number (else a constant array, e.g. under ``lax.scan``)."""
    return isinstance(scale, (int, float))


def scale_fwd_any(x: jax.Array, scale) -> jax.Array:
    """``scale_fwd`` for a Python float or a constant array scale (no gradient to it)."""
    if is_static(scale):
        return scale_fwd(x, scale)
    return _scale_fwd_array(x, jnp.asarray(scale, jnp.float32))


def scale_bwd_any(x: jax.Array, scale) -> jax.Array:
    """``scale_bwd`` for a Python float or a constant array scale (no gradient to it)."""
    if is_static(scale):
        return scale_bwd(x, scale)
    return _scale_bwd_array(x, jnp.asarray(scale, jnp.float32))
