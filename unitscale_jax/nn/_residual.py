"""Residual split/add whose tau may be a traced scalar (for scanned layer stacks).

Under ``jax.lax.scan`` every layer runs the same traced body, so the per-layer ``tau`` of
u-muP's residual rule arrives as an element of a constant array instead of a Python float.
The values are still fixed by the configuration (never measured); only their carrier
changes.

Values and gradients are those of ``ops.residual_split`` / ``ops.residual_add`` (tested
against them). The skip path's two scales (backward ``b`` at the split, forward ``b`` at the
add, ``b = 1/sqrt(1 + tau^2)``) are together just ``b * x`` with its ordinary gradient, so the
skip is returned unscaled by ``residual_split`` and multiplied by ``b`` in ``residual_add``;
only the branch keeps the custom scales (``a = tau/sqrt(1 + tau^2)``: backward at the
split, forward at the add). Use the two functions together, as a pair.
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
    """``(branch input, skip)``; the pair with ``residual_add`` equals the ops' pair."""
    if _static(tau):
        return ops.scale_bwd(x, tau / (1.0 + tau**2) ** 0.5), x
    tau = jnp.asarray(tau, jnp.float32)
    return _scale_bwd(x, tau / jnp.sqrt(1.0 + tau * tau)), x


def residual_add(residual: jax.Array, skip: jax.Array, tau) -> jax.Array:
    """Branch output and skip weighted by ``tau`` (after ``residual_split``)."""
    if _static(tau):
        denom = (1.0 + tau**2) ** 0.5
        return ops.scale_fwd(residual, tau / denom) + skip * jnp.asarray(1.0 / denom, skip.dtype)
    tau = jnp.asarray(tau, jnp.float32)
    denom = jnp.sqrt(1.0 + tau * tau)
    return _scale_fwd(residual, tau / denom) + skip * (1.0 / denom).astype(skip.dtype)
