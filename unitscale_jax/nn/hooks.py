"""Two small hooks the modules call: a low-precision policy and activation taps.

Precision policy
----------------
Every matmul input and weight of ``Linear`` / ``LinearReadout`` and the q, k, v of attention
pass through ``apply_precision(policy, x, role)``, the single place where a low-precision
policy (``unitscale_jax.precision``) plugs in. A policy is any hashable object with

    fwd(x, role) -> x'   # e.g. quantise the value (forward format)
    bwd(x, role) -> x'   # identity forward; e.g. quantise the gradient flowing into x

and ``apply_precision`` returns ``policy.bwd(policy.fwd(x, role), role)``; ``None`` is a no-op.
Roles are ``"<module role>.input"`` and ``"<module role>.kernel"`` for projections and
``"<attention role>.q"`` / ``.k`` / ``.v`` for attention, where the module roles are
``attn.qkv_proj``, ``attn.out_proj``, ``cross_attn.q_proj``, ``cross_attn.kv_proj``,
``cross_attn.out_proj``, ``mlp.up_proj``, ``mlp.gate_proj``, ``mlp.down_proj``, ``readout``,
``cls_head`` and ``token_head``; attention roles are ``attn`` and ``cross_attn``. A policy can
make per-layer exceptions by matching on the role (e.g. keep ``*.out_proj.*`` in bf16).

Taps
----
``tap(name, x)`` marks an activation. Outside ``capture_activations`` it returns ``x``
unchanged (zero cost). Inside, it records ``x`` and adds a zero perturbation whose gradient
is the gradient of the loss with respect to ``x``, which is how the tests check that every
activation and every activation gradient of a u-muP model is unit scale. Taps inside a
``jax.lax.scan`` body (scanned layer stacks) are skipped: build with ``scan_layers=False``
to see per-layer activations.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator, Optional

import jax
import jax.numpy as jnp

PROJECTION_ROLES = (
    "attn.qkv_proj", "attn.out_proj", "cross_attn.q_proj", "cross_attn.kv_proj",
    "cross_attn.out_proj", "mlp.up_proj", "mlp.gate_proj", "mlp.down_proj", "readout",
    "cls_head", "token_head",
)
ATTENTION_ROLES = ("attn", "cross_attn")


def apply_precision(policy: Any, x: jax.Array, role: str) -> jax.Array:
    """Applies a low-precision policy to a matmul operand (no-op for ``policy=None``).

    Args:
      policy: None, or an object with ``fwd(x, role)`` and ``bwd(x, role)``.
      x: the operand (activation, weight, or attention q/k/v).
      role: where it is used, e.g. ``"mlp.down_proj.kernel"`` or ``"attn.q"``.

    Returns:
      ``policy.bwd(policy.fwd(x, role), role)``, or ``x`` when ``policy`` is None.
    """
    if policy is None:
        return x
    return policy.bwd(policy.fwd(x, role), role)


class _TapState(threading.local):
    def __init__(self):
        self.active: Optional[dict] = None
        self.suspended = 0


_TAPS = _TapState()


class Captured:
    """What ``capture_activations`` collects: ``values[name]`` and ``perturbations``."""

    def __init__(self, perturbations: Optional[dict]):
        self.perturbations = perturbations
        self.values: dict[str, jax.Array] = {}
        self.counter = 0


@contextlib.contextmanager
def capture_activations(perturbations: Optional[dict] = None) -> Iterator[Captured]:
    """Collects tapped activations (and adds ``perturbations`` to them) while active.

    Names are ``"<call order>.<tap name>"`` so repeated taps stay distinct. Typical use:
    run once with ``perturbations=None`` to learn the names and shapes, then differentiate a
    function that runs the model inside ``capture_activations(perts)`` with respect to
    ``perts`` (a dict of zeros): those gradients are the activation gradients.

    Yields:
      A ``Captured`` whose ``values`` fill in as the model runs.
    """
    prev = _TAPS.active
    cap = Captured(perturbations)
    _TAPS.active = cap
    try:
        yield cap
    finally:
        _TAPS.active = prev


@contextlib.contextmanager
def suspend_taps() -> Iterator[None]:
    """Disables taps (used while tracing a scan body, whose values cannot leave it)."""
    _TAPS.suspended += 1
    try:
        yield
    finally:
        _TAPS.suspended -= 1


def tap(name: str, x: jax.Array) -> jax.Array:
    """Marks activation ``x`` under ``name`` (identity unless capturing)."""
    cap = _TAPS.active
    if cap is None or _TAPS.suspended:
        return x
    key = f"{cap.counter:03d}.{name}"
    cap.counter += 1
    if cap.perturbations is not None and key in cap.perturbations:
        x = x + cap.perturbations[key].astype(x.dtype)
    cap.values[key] = x
    return x


def zeros_like_captured(values: dict) -> dict:
    """Zero perturbations matching captured activations."""
    return {k: jnp.zeros(v.shape, v.dtype) for k, v in values.items()}
