"""Unit-scaled normalisation layers (over the last axis).

The forward pass is the ordinary normalisation (its output is unit-scale by construction);
only the gradients of the gain and bias are scaled, by ``sqrt(d / x.size) = 1/sqrt(tokens)``,
because they sum over every token (Blake et al., 2023, table A.2; ``unit_scaling`` 0.3.5).
"""

from __future__ import annotations

from typing import Optional

import jax

from unitscale_jax.ops import plain
from unitscale_jax.ops._scale import row_multiple


def _param_grad_scale(x) -> float:
    # the tokens of the whole batch when x is one of several microbatches (ops.microbatches)
    return (x.shape[-1] / max(x.size * row_multiple(), 1)) ** 0.5 if x.ndim else 1.0


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
    return plain._layer_norm(x, scale, bias, eps, _param_grad_scale(x))


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
    return plain._rms_norm(x, scale, eps, _param_grad_scale(x))
