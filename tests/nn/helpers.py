"""Helpers shared by the tests of unitscale_jax.nn."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unitscale_jax import nn as unn


def flat_params(model):
    """{path tuple: array} of a model's parameters."""
    return {tuple(p): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def flat_infos(model):
    return {tuple(p): v for p, v in nnx.to_flat_state(unn.param_info(model))}


def unstack_into(scanned, unrolled):
    """Copies a scanned model's stacked layer parameters into an unrolled twin."""
    src = flat_params(scanned)
    flat = nnx.to_flat_state(nnx.state(unrolled, nnx.Param))
    new = []
    for path, var in flat:
        path = tuple(path)
        if "layers" in path:
            i = path.index("layers")
            value = src[path[:i + 1] + path[i + 2:]][path[i + 1]]
        else:
            value = src[path]
        new.append((path, var.replace(jnp.asarray(value))))
    nnx.update(unrolled, nnx.from_flat_state(new))


def loss_and_grads(model, fn, *args):
    """``fn(model, *args)`` and its parameter gradients as {path: array}, jitted."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    @jax.jit
    def run(params, *args):
        return jax.value_and_grad(lambda p: fn(nnx.merge(graphdef, p, rest), *args))(params)

    loss, grads = run(params, *args)
    return loss, {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(grads)}


def random_ids(seed, shape, vocab):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab)
