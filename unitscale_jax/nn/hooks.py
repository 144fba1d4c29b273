"""Two small hooks the modules call: a low-precision policy and activation taps.

Precision policy
----------------
Every projection (``Linear`` / ``LinearReadout``) and attention core routes its operands
through this module, the single place where a low-precision policy
(``unitscale_jax.precision.PrecisionPolicy``) plugs in. A policy is any hashable object with

    linear(x, kernel, bias, *, role, layer, constraint, rng)   # unit-scaled ops.linear /
                                                               # ops.linear_readout (role
                                                               # "readout") on cast operands
    dot(x, kernel, role, *, layer, rng)                        # plain x @ kernel (SP / muP)
    attention_inputs(q, k, v, *, layer, rng) -> (q, k, v)      # forward format on q, k, v
    attention_output(out, *, layer, rng)                       # backward format on its grad

``policy=None`` (the default) is a no-op: the modules call the ops directly. Roles passed to
the policy: ``attn_qkv`` (fused q/k/v and cross-attention q and k/v projections),
``attn_out``, ``ffn_up``, ``ffn_gate``, ``ffn_down`` and ``readout`` (LM readout and the
classification heads). ``layer`` is the layer index in unrolled stacks
(``scan_layers=False``) and None elsewhere (scanned layers share one traced body, so
per-layer exceptions need ``scan_layers=False``).

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

from unitscale_jax.nn import _maths

POLICY_METHODS = ("linear", "dot", "attention_inputs", "attention_output")

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


def project(policy: Any, x: jax.Array, kernel: jax.Array, bias: Optional[jax.Array], *,
            role: str, parametrization: str, constraint: Optional[str], readout: bool,
            layer: Optional[int] = None, rng: Optional[jax.Array] = None) -> jax.Array:
    """A projection ``x @ kernel (+ bias)`` in the module's parametrization, under ``policy``.

    Args:
      policy: None or a precision policy.
      x, kernel, bias: operands (kernel ``[fan_in, fan_out]``).
      role: the module role (e.g. ``"mlp.down_proj"``), mapped to the policy's role.
      parametrization: ``"umup"``, ``"sp"`` or ``"mup"``.
      constraint: u-muP constraint (ignored by the readout).
      readout: a readout (``linear_readout``; muP's ``1/fan_in``).
      layer: layer index for per-layer policy exceptions.
      rng: key for stochastic rounding.
    """
    policy = _active(policy)
    if policy is None:
        if readout:
            return _maths.readout(x, kernel, bias, parametrization)
        return _maths.linear(x, kernel, bias, parametrization, constraint)
    prole = POLICY_ROLES.get(role, "linear")
    if parametrization == "umup":
        return policy.linear(x, kernel, bias, role="readout" if readout else prole, layer=layer,
                             constraint=None if readout else constraint, rng=rng)
    y = policy.dot(x, kernel, "readout" if readout else prole, layer=layer, rng=rng)
    if bias is not None:
        y = y + bias.astype(y.dtype)
    if readout and parametrization == "mup":
        y = y * (1.0 / kernel.shape[0])
    return y


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


def tapped_value_and_grad(fn: Any, model: Any, *args: Any):
    """``fn(model, *args)`` with taps on, differentiated w.r.t. every tap and parameter.

    Traceable (use under ``jax.jit``): the one forward and backward pass behind
    ``activation_stats`` and ``unitscale_jax.analysis.forward_backward``.

    Args:
      fn: ``fn(model, *args) -> scalar`` (e.g. ``lambda m, ids: m.loss(ids)``).
      model: an ``nnx.Module`` (layers must not be scanned for per-layer taps).
      *args: arrays passed to ``fn``.

    Returns:
      ``(value, activations, activation_grads, params, param_grads)``: dicts keyed by tap
      (``"<call order>.<tap name>"``), then ``nnx.State`` s of the ``nnx.Param`` s.
    """
    from flax import nnx

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def run(params, perts, *args):
        with capture_activations(perts) as cap:
            out = fn(nnx.merge(graphdef, params, rest), *args)
        return out, cap.values

    shapes = jax.eval_shape(lambda p, *a: run(p, None, *a)[1], params, *args)
    perts = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items()}
    grad_fn = jax.value_and_grad(run, argnums=(0, 1), has_aux=True)
    (out, values), (g_params, g_values) = grad_fn(params, perts, *args)
    return out, values, g_values, params, g_params


def activation_stats(fn: Any, model: Any, *args: Any, include_params: bool = False) -> dict:
    """Std of every tapped activation and of the gradient of ``fn`` with respect to it.

    Args:
      fn: ``fn(model, *args) -> scalar`` (e.g. ``lambda m, ids: m.loss(ids)``).
      model: an ``nnx.Module`` (layers must not be scanned for per-layer taps).
      *args: arrays passed to ``fn``.
      include_params: also report every parameter, under ``"param/<path>"``.

    Returns:
      ``{name: (std of the value, std of its gradient)}`` as Python floats, activations in
      call order. One jitted forward and backward pass (``tapped_value_and_grad``).
    """
    from flax import nnx

    _, values, grads, params, pgrads = nnx.jit(
        lambda m, *a: tapped_value_and_grad(fn, m, *a))(model, *args)
    std = lambda x: float(jnp.std(jnp.asarray(x, jnp.float32)))  # noqa: E731
    out = {k: (std(values[k]), std(grads[k])) for k in sorted(values)}
    if include_params:
        out.update({name: (std(v), std(g)) for name, v, g in named_params(params, pgrads)})
    return out


def named_params(params: Any, grads: Any) -> Iterator[tuple[str, jax.Array, jax.Array]]:
    """``("param/<path>", value, gradient)`` for every parameter of two parallel ``nnx.State`` s."""
    from flax import nnx

    flat_g = dict(nnx.to_flat_state(grads))
    for path, var in nnx.to_flat_state(params):
        yield "param/" + "/".join(str(k) for k in path), var[...], flat_g[path][...]
