"""Every tapped activation and its gradient, from one forward and backward pass.

Models mark activations with ``unitscale_jax.taps.tap``; ``tapped_value_and_grad`` runs a
loss with the taps on and differentiates it with respect to every tap and parameter, and
``activation_stats`` reduces that to the std of each value and gradient (how the tests
check that every tensor of a u-muP model sits near unit scale).
"""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax.taps import capture_activations


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
    _, values, grads, params, pgrads = nnx.jit(
        lambda m, *a: tapped_value_and_grad(fn, m, *a))(model, *args)
    std = lambda x: float(jnp.std(jnp.asarray(x, jnp.float32)))  # noqa: E731
    out = {k: (std(values[k]), std(grads[k])) for k in sorted(values)}
    if include_params:
        out.update({name: (std(v), std(g)) for name, v, g in named_params(params, pgrads)})
    return out


def named_params(params: Any, grads: Any) -> Iterator[tuple[str, jax.Array, jax.Array]]:
    """``("param/<path>", value, gradient)`` for every parameter of two parallel ``nnx.State`` s."""
    flat_g = dict(nnx.to_flat_state(grads))
    for path, var in nnx.to_flat_state(params):
        yield "param/" + "/".join(str(k) for k in path), var[...], flat_g[path][...]
