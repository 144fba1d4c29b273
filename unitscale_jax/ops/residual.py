"""Unit-scaled residual connections and u-muP's residual scaling rule for Transformers."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from unitscale_jax.ops._scale import is_static, scale_bwd_any, scale_fwd_any


def _weights(tau):
    """``(tau / sqrt(1 + tau^2), 1 / sqrt(1 + tau^2))``: the branch and skip weights.

    ``tau`` is a Python float or, in a scanned layer stack, a constant array element (the
    per-layer value of u-muP's rule): the weights are then arrays, still fixed by the
    configuration and never given a gradient.
    """
    if is_static(tau):
        tau = float(tau)
        if not tau >= 0:
            raise ValueError(f"residual tau must be >= 0, got {tau}.")
        denom = (1.0 + tau**2) ** 0.5
        return tau / denom, 1.0 / denom
    tau = jnp.asarray(tau, jnp.float32)
    if tau.ndim:
        raise ValueError(f"residual tau must be a scalar, got shape {tau.shape}.")
    denom = jnp.sqrt(1.0 + tau * tau)
    return tau / denom, 1.0 / denom


def residual_split(x: jax.Array, tau=1.0) -> tuple[jax.Array, jax.Array]:
    """Splits ``x`` into ``(residual, skip)`` before a residual branch.

    Scaling rule (Blake et al., 2023, section 5.3): both are ``x`` in the forward pass; in
    the backward pass the residual branch's gradient is scaled by ``tau / sqrt(1 + tau^2)``
    and the skip's by ``1 / sqrt(1 + tau^2)``, mirroring ``residual_add``'s forward weights,
    so gradients stay unit scale while the branch weights apply in both directions.

    Args:
      x: the residual stream.
      tau: weight of the residual branch relative to the skip: a Python float, or a scalar
        constant array (a scanned stack's per-layer value).

    Returns:
      ``(residual, skip)``.
    """
    a, b = _weights(tau)
    return scale_bwd_any(x, a), scale_bwd_any(x, b)


def residual_add(residual: jax.Array, skip: jax.Array, tau=1.0) -> jax.Array:
    """Adds a residual branch to its skip: ``r * tau / sqrt(1 + tau^2) + s / sqrt(1 + tau^2)``.

    Scaling rule: forward-only weights (gradients pass unscaled; ``residual_split`` applies
    the backward weights), keeping a unit-variance sum of two unit-variance inputs.

    Args:
      residual: the branch output.
      skip: the skip connection.
      tau: as in ``residual_split``.

    Returns:
      The weighted sum.
    """
    a, b = _weights(tau)
    return scale_fwd_any(residual, a) + scale_fwd_any(skip, b)


def residual_apply(fn: Callable[[jax.Array], jax.Array], x: jax.Array, tau=1.0) -> jax.Array:
    """``residual_add(fn(residual), skip, tau)`` after ``residual_split(x, tau)``.

    Computed with the skip's two scales (``b = 1/sqrt(1 + tau^2)`` backward at the split and
    forward at the add) as one ``b * x`` with its ordinary gradient, which is what they are
    together; only the branch keeps custom scales.

    Args:
      fn: the residual branch.
      x: the residual stream.
      tau: as in ``residual_split``.

    Returns:
      The new residual stream.
    """
    a, b = _weights(tau)
    y = fn(scale_bwd_any(x, a))
    return scale_fwd_any(y, a) + x * jnp.asarray(b, x.dtype)


def transformer_residual_scaling_rule(
    residual_mult: float = 1.0, residual_attn_ratio: float = 1.0, depth_exponent: float = 0.5
) -> Callable[[int, int], float]:
    """u-muP's rule for the residual weights ``tau_i`` of a Transformer stack.

    With ``alpha_mlp = residual_mult * sqrt(2 / (1 + rho^2))`` and
    ``alpha_attn = rho * alpha_mlp`` (``rho = residual_attn_ratio``), branch ``i`` of
    ``L = 2 * n_layers`` (even: attention, odd: MLP) gets
    ``tau_i = alpha_i / sqrt((L/2)^(2 a) + n_attn * alpha_attn^2 + n_mlp * alpha_mlp^2)``
    where ``n_attn = (i + 1) // 2`` and ``n_mlp = i // 2`` count the branches before it and
    ``a = depth_exponent``. Every attention branch then contributes equally, as does every MLP
    branch; their ratio is ``rho``. This is the unit-scaled form of the un-normalised stream
    ``h_{i+1} = h_i + m_i f_i(h_i)`` with a unit-variance embedding ``h_0`` and branch
    multipliers ``m_i = alpha_i (L/2)^-a``: ``tau_i = m_i / sqrt(Var h_i)``.

    ``a = 1/2`` (the default) is u-muP's rule (Blake et al., 2025, appendix G; depth-muP,
    Yang et al., 2023): the branches together weigh ``residual_mult`` against the embedding,
    and defaults give ``1/sqrt(L/2 + i)``. ``a = 1`` is CompleteP's (Dey et al., 2025):
    each branch weighs ``1/L``, so that every layer's update stays of the same order as the
    depth grows (pair it with the learning-rate factor ``depth^(a - 1)``, which
    ``optim.umup_factor`` reads from the parameters' ``depth_exponent``).

    Args:
      residual_mult: u-muP's ``alpha_res``.
      residual_attn_ratio: u-muP's ``alpha_res-attn-ratio``.
      depth_exponent: ``a > 0``; the models take it in ``[0.5, 1]``
        (``TransformerConfig.depth_exponent``), where the analyses above hold.

    Returns:
      ``tau(index, n_branches) -> float``.
    """
    if residual_mult <= 0 or residual_attn_ratio <= 0:
        raise ValueError("residual_mult and residual_attn_ratio must be > 0.")
    if not float(depth_exponent) > 0:
        raise ValueError(f"depth_exponent must be > 0, got {depth_exponent}.")
    alpha_mlp = residual_mult * (2.0 / (1.0 + residual_attn_ratio**2)) ** 0.5
    alpha_attn = residual_attn_ratio * alpha_mlp

    def tau(index: int, n_branches: int) -> float:
        if not 0 <= index < n_branches:
            raise ValueError(f"branch index {index} outside [0, {n_branches}).")
        n_attn, n_mlp = (index + 1) // 2, index // 2
        alpha = alpha_attn if index % 2 == 0 else alpha_mlp
        embed = (n_branches / 2) ** (2.0 * depth_exponent)
        return alpha / (embed + n_attn * alpha_attn**2 + n_mlp * alpha_mlp**2) ** 0.5

    return tau
