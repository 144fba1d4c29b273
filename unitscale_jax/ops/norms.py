"""Unit-scaled normalisation layers (over the last axis).

The forward pass is the ordinary normalisation (its output is unit-scale by construction);
only the gradients of the gain and bias are scaled, by ``sqrt(d / x.size) = 1/sqrt(tokens)``,
because they sum over every token (Blake et al., 2023, table A.2; ``unit_scaling`` 0.3.5).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from unitscale_jax.ops._checks import require_float, require_min_rank
from unitscale_jax.ops import _wide


def _check_param(p, d: int, name: str, op: str) -> None:
    if p is not None:
        require_float(p, name, op)
        if p.shape != (d,):
            raise ValueError(f"{op}: {name} must have shape ({d},) to match x's last axis, got {p.shape}.")


def layer_norm(
    x: jax.Array,
    scale: Optional[jax.Array] = None,
    bias: Optional[jax.Array] = None,
    *,
    eps: float = 1e-5,
) -> jax.Array:
    """Layer normalisation over the last axis, with unit-scaled parameter gradients.

    Scaling rule: forward unchanged ``(x - mean) / sqrt(var + eps) * scale + bias``;
    ``beta_scale = beta_bias = sqrt(d / x.size)``. Statistics are computed in float32.

    Args:
      x: ``[..., d]``.
      scale: optional gain ``[d]`` (initialised to 1).
      bias: optional bias ``[d]`` (initialised to 0).
      eps: added to the variance.

    Returns:
      An array of ``x``'s shape and dtype.
    """
    require_float(x, "x", "layer_norm")
    require_min_rank(x, 1, "x", "layer_norm")
    d = x.shape[-1]
    _check_param(scale, d, "scale", "layer_norm")
    _check_param(bias, d, "bias", "layer_norm")
    param_grad_scale = (d / max(x.size, 1)) ** 0.5
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    if scale is not None:
        y = _wide.mul_param(y, scale, param_grad_scale)
    if bias is not None:
        y = _wide.add_param(y, bias, param_grad_scale)
    return y


def rms_norm(x: jax.Array, scale: Optional[jax.Array] = None, *, eps: float = 1e-5) -> jax.Array:
    """RMS normalisation over the last axis, with a unit-scaled gain gradient.

    Scaling rule: forward unchanged ``x / sqrt(mean(x^2) + eps) * scale``;
    ``beta_scale = sqrt(d / x.size)``. The RMS is computed in float32 and cast back, as in
    the reference.

    Args:
      x: ``[..., d]``.
      scale: optional gain ``[d]``; u-muP's default is non-parametric (None).
      eps: added to the mean square.

    Returns:
      An array of ``x``'s shape and dtype.
    """
    require_float(x, "x", "rms_norm")
    require_min_rank(x, 1, "x", "rms_norm")
    d = x.shape[-1]
    _check_param(scale, d, "scale", "rms_norm")
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    y = x / jnp.sqrt(ms + eps).astype(x.dtype)
    if scale is not None:
        y = _wide.mul_param(y, scale, (d / max(x.size, 1)) ** 0.5)
    return y
