"""Residual split/add whose tau may be a traced scalar (for scanned layer stacks).

Under ``jax.lax.scan`` every layer runs the same traced body, so the per-layer ``tau`` of
u-muP's residual rule arrives as an element of a constant array instead of a Python float.
The values are still fixed by the configuration (never measured); only their carrier
changes. For Python-float ``tau`` these functions call ``unitscale_jax.ops`` directly; for an
array ``tau`` they apply the identical forward/backward scales with a ``custom_vjp``
(tested against the ops).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unitscale_jax import ops


@jax.custom_vjp
def _scale_bwd(x, s):
    return x


def _scale_bwd_fwd(x, s):
    return x, s


def _scale_bwd_bwd(s, g):
    return g * s.astype(g.dtype), jnp.zeros_like(s)


_scale_bwd.defvjp(_scale_bwd_fwd, _scale_bwd_bwd)


@jax.custom_vjp
def _scale_fwd(x, s):
    return x * s.astype(x.dtype)


def _scale_fwd_fwd(x, s):
    return x * s.astype(x.dtype), s


def _scale_fwd_bwd(s, g):
    return g, jnp.zeros_like(s)


_scale_fwd.defvjp(_scale_fwd_fwd, _scale_fwd_bwd)


def _static(tau) -> bool:
    return isinstance(tau, (int, float))


def residual_split(x: jax.Array, tau) -> tuple[jax.Array, jax.Array]:
    """``ops.residual_split`` for a float or (traced) scalar-array ``tau``."""
    if _static(tau):
        return ops.residual_split(x, tau)
    tau = jnp.asarray(tau, jnp.float32)
    denom = jnp.sqrt(1.0 + tau * tau)
    return _scale_bwd(x, tau / denom), _scale_bwd(x, 1.0 / denom)


def residual_add(residual: jax.Array, skip: jax.Array, tau) -> jax.Array:
    """``ops.residual_add`` for a float or (traced) scalar-array ``tau``."""
    if _static(tau):
        return ops.residual_add(residual, skip, tau)
    tau = jnp.asarray(tau, jnp.float32)
    denom = jnp.sqrt(1.0 + tau * tau)
    return _scale_fwd(residual, tau / denom) + _scale_fwd(skip, 1.0 / denom)
