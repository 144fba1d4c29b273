"""The precision hook: where a low-precision policy plugs into the modules.

Every projection (``Linear`` / ``LinearReadout``) and attention core routes its operands
through this module, the single place where a low-precision policy
(``unitscale_jax.precision.PrecisionPolicy``) plugs in. A policy is any hashable object with

    cast_compute(x) -> x                                       # the compute dtype
    dot_general(role, *, layer, rng) -> None | dot_general     # the matmul of that role
    attention_inputs(q, k, v, *, layer, rng) -> (q, k, v)      # forward format on q, k, v
    attention_output(out, *, layer, rng)                       # backward format on its grad

A policy supplies matmuls, never scaling rules: the projection is the module's
parametrization's ``linear`` / ``readout`` (``ops.linear`` for u-muP, ``ops.plain.linear``
for SP and muP) with the policy's ``dot_general`` plugged in (None: the op's own fast form).

``policy=None`` (the default) is a no-op. Roles passed to the policy: ``attn_qkv`` (fused
q/k/v and cross-attention q and k/v projections), ``attn_out``, ``ffn_up``, ``ffn_gate``,
``ffn_down`` and ``readout`` (LM readout and the classification heads). ``layer`` is the
layer index in unrolled stacks (``scan_layers=False``) and None elsewhere (scanned layers
share one traced body, so per-layer exceptions need ``scan_layers=False``).
"""

from __future__ import annotations

from typing import Any, Optional

import jax

POLICY_METHODS = ("cast_compute", "dot_general", "attention_inputs", "attention_output")

# module role -> policy role
POLICY_ROLES = {
    "attn.qkv_proj": "attn_qkv", "cross_attn.q_proj": "attn_qkv", "cross_attn.kv_proj": "attn_qkv",
    "attn.out_proj": "attn_out", "cross_attn.out_proj": "attn_out",
    "mlp.up_proj": "ffn_up", "mlp.gate_proj": "ffn_gate", "mlp.down_proj": "ffn_down",
    "readout": "readout", "cls_head": "readout", "token_head": "readout",
}


def check_policy(policy: Any) -> None:
    """Raises unless ``policy`` is None or a hashable object with the policy methods."""
    if policy is None:
        return
    missing = [m for m in POLICY_METHODS if not callable(getattr(policy, m, None))]
    if missing:
        raise ValueError(f"precision policy {policy!r} lacks method(s) {missing}; expected an "
                         f"object like unitscale_jax.precision.PrecisionPolicy.")
    try:
        hash(policy)
    except TypeError as e:
        raise ValueError("precision policy must be hashable (e.g. a frozen dataclass): it is "
                         "static model structure.") from e


def _active(policy: Any) -> Any:
    """None for no policy or one that changes nothing (fp32): those take the same fused path."""
    return None if policy is None or getattr(policy, "is_identity", False) else policy


def project(policy: Any, parametrization: Any, x: jax.Array, kernel: jax.Array,
            bias: Optional[jax.Array], *, role: str, constraint: Optional[str], readout: bool,
            layer: Optional[int] = None, rng: Optional[jax.Array] = None) -> jax.Array:
    """A projection ``x @ kernel (+ bias)`` by ``parametrization``'s rule, under ``policy``.

    Args:
      policy: None or a precision policy.
      parametrization: a ``unitscale_jax.nn.Parametrization``.
      x: input ``[..., fan_in]``.
      kernel: weight ``[fan_in, fan_out]``.
      bias: optional ``[fan_out]`` bias.
      role: the module role (e.g. ``"mlp.down_proj"``), mapped to the policy's role.
      constraint: u-muP constraint of a hidden projection (the readout takes none).
      readout: a readout (``parametrization.readout``).
      layer: layer index for per-layer policy exceptions.
      rng: key for stochastic rounding.
    """
    policy = _active(policy)
    dot = None
    if policy is not None:
        prole = "readout" if readout else POLICY_ROLES.get(role, "linear")
        dot = policy.dot_general(prole, layer=layer, rng=rng)
        bias = policy.cast_compute(bias)
        if dot is None:  # a plugged-in dot casts its own operands
            x, kernel = policy.cast_compute(x), policy.cast_compute(kernel)
    if readout:
        return parametrization.readout(x, kernel, bias, dot_general=dot)
    return parametrization.linear(x, kernel, bias, constraint=constraint, dot_general=dot)


def attention_inputs(policy: Any, q, k, v, *, layer: Optional[int] = None, rng=None):
    """q, k, v under the policy's forward format (identity for ``policy=None``)."""
    policy = _active(policy)
    if policy is None:
        return q, k, v
    return policy.attention_inputs(q, k, v, layer=layer, rng=rng)


def attention_output(policy: Any, out, *, layer: Optional[int] = None, rng=None):
    """The attention core's output, gradient under the policy's backward format."""
    policy = _active(policy)
    if policy is None:
        return out
    return policy.attention_output(out, layer=layer, rng=rng)


def set_precision(model: Any, policy: Any) -> None:
    """Sets the precision policy of every module of ``model`` (static: re-jit afterwards)."""
    check_policy(policy)
    model.set_attributes(precision=policy, raise_if_not_found=False)
