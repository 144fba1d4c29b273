"""Fixtures for the optimizer tests."""

import jax
import pytest
from flax import nnx
from optim_helpers import TinyLM, lm_loss

from unitscale_jax.nn import param_info


@pytest.fixture
def tiny_lm():
    return TinyLM(rngs=nnx.Rngs(0))


@pytest.fixture
def tiny_batch():
    return jax.random.randint(jax.random.key(1), (4, 9), 0, 32)


@pytest.fixture
def tiny_grads(tiny_lm, tiny_batch):
    """(params, grads, info) of TinyLM as pure nnx.States."""
    params = nnx.state(tiny_lm, nnx.Param)
    grads = nnx.jit(nnx.grad(lm_loss))(tiny_lm, tiny_batch)
    return nnx.as_pure(params), nnx.as_pure(nnx.state(grads, nnx.Param)), param_info(tiny_lm)
