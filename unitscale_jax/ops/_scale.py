"""The two scaling primitives every unit-scaled op is built from.

A unit-scaled op is ``scale_fwd(f(scale_bwd(x, beta)), alpha)``: ``alpha`` multiplies the
forward output and ``beta`` the gradient sent back to ``x``. Both are Python floats computed
from static shapes (Blake et al., "Unit Scaling", ICML 2023, section 4).
"""

from __future__ import annotations

import functools

import jax


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
