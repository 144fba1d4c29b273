"""Activation taps: how a model marks the activations that analysis tools read.

``tap(name, x)`` marks an activation. Outside ``capture_activations`` it returns ``x``
unchanged (zero cost). Inside, it records ``x`` and adds a zero perturbation whose gradient
is the gradient of the loss with respect to ``x``, which is how the analysis tools
(``unitscale_jax.analysis.activation_stats``, the coordinate check) and the tests check that
every activation and every activation gradient of a u-muP model is unit scale. Taps inside a
``jax.lax.scan`` body (scanned layer stacks) are skipped: build with ``scan_layers=False``
to see per-layer activations.

A bottom-layer module: it imports nothing else of the package, so models (``nn``) place taps
and ``analysis`` reads them without either importing the other.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Optional

import jax
import jax.numpy as jnp


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
