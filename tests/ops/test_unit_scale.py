"""The unit-scale property: unit-variance inputs and incoming gradients give unit-variance
outputs and outgoing gradients, where the rule claims it (as in the reference's own tests).

Inputs are 2^8 x 2^10, weights 2^10 x 2^12, drawn fresh for every tensor and seed.
"""

import jax
import jax.numpy as jnp
import pytest

from unitscale_jax import ops

SEEDS = [0, 1, 2]


def randn(key, *shape):
    return jax.random.normal(key, shape)


def unit_grads(fn, *args):
    """Output and the gradients of every arg under a unit-normal upstream gradient."""
    out, vjp = jax.vjp(fn, *args)
    g = jax.random.normal(jax.random.key(12345), out.shape)
    return out, vjp(g)


def std(x):
    return float(jnp.std(x))


def rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def assert_unit(*xs, stat=std, tol=0.1):
    for x in xs:
        assert abs(stat(x) - 1) <= tol, stat(x)


def assert_not_unit(*xs, stat=std, tol=0.1):
    for x in xs:
        assert abs(stat(x) - 1) > tol, stat(x)


@pytest.fixture(params=SEEDS)
def keys(request):
    return jax.random.split(jax.random.key(request.param), 8)


def test_linear(keys):
    x, w, b = randn(keys[0], 2**8, 2**10), randn(keys[1], 2**10, 2**12), randn(keys[2], 2**12)
    y, (gx, gw, gb) = unit_grads(lambda x, w, b: ops.linear(x, w, b, constraint=None), x, w, b)
    assert_unit(y, gx, gw, gb)
    y, (gx, gw, gb) = unit_grads(lambda x, w, b: ops.linear(x, w, b), x, w, b)
    assert_unit(y, gw, gb)
    assert_not_unit(gx)  # constrained to the output scale: grad_x has std sqrt(fan_out/fan_in) = 2
    y, (gx, gw) = unit_grads(lambda x, w: ops.linear(x, w, constraint="to_grad_input_scale"), x, w)
    assert_unit(gx, gw)
    assert_not_unit(y)


def test_linear_readout(keys):
    x, w = randn(keys[0], 2**8, 2**10), randn(keys[1], 2**10, 2**12)
    y, (gx, gw) = unit_grads(ops.linear_readout, x, w)
    assert abs(std(y) * 2**5 - 1) <= 0.1  # std = fan_in^-1/2 at init
    assert_unit(gx, gw)


def test_matmul(keys):
    a, b = randn(keys[0], 2**8, 2**10), randn(keys[1], 2**10, 2**12)
    y, (ga, gb) = unit_grads(lambda a, b: ops.matmul(a, b, constraint=None), a, b)
    assert_unit(y, ga, gb)
    y, (ga, gb) = unit_grads(ops.matmul, a, b)
    assert_unit(y)
    assert_not_unit(ga, gb)


def test_add(keys):
    a, b = randn(keys[0], 2**8, 2**10), randn(keys[1], 2**10)
    y, (ga, gb) = unit_grads(lambda a, b: ops.add(a, b, constraint=None), a, b)
    assert_unit(y, ga, gb)
    a3, b3 = randn(keys[2], 2**8, 1, 2**10), randn(keys[3], 2**9, 2**10)
    y, (ga, gb) = unit_grads(lambda a, b: ops.add(a, b, constraint=None), a3, b3)
    assert_unit(y, ga, gb)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
def test_gelu_silu_unconstrained(keys, mult):
    x = randn(keys[0], 2**8, 2**10)
    for op in (ops.gelu, ops.silu):
        y, (gx,) = unit_grads(lambda x: op(x, mult=mult, constraint=None), x)
        assert_unit(y, gx)


def test_gelu_constraints(keys):
    x = randn(keys[0], 2**8, 2**10)
    y, (gx,) = unit_grads(lambda x: ops.gelu(x), x)
    assert_unit(y)
    assert_not_unit(gx)
    y, (gx,) = unit_grads(lambda x: ops.gelu(x, constraint="to_grad_input_scale"), x)
    assert_unit(gx)
    assert_not_unit(y)


@pytest.mark.parametrize("mult", [0.25, 1.0, 4.0])
def test_silu_glu(keys, mult):
    x, g = randn(keys[0], 2**8, 2**10), randn(keys[1], 2**8, 2**10)
    y, (gx, gg) = unit_grads(lambda x, g: ops.silu_glu(x, g, mult=mult), x, g)
    assert_unit(y, gx, gg)


def test_softmax(keys):
    # As in the reference, mult = 1/4: the interpolation is a poor model near mult = 1.
    x = randn(keys[0], 2**4, 2**12)
    y, (gx,) = unit_grads(lambda x: ops.softmax(x, -1, mult=0.25, constraint=None), x)
    assert_unit(y, gx, stat=rms)
    y, (gx,) = unit_grads(lambda x: ops.softmax(x, 0, mult=0.25, constraint=None), x.T)
    assert_unit(y, gx, stat=rms)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.9])
def test_dropout(keys, rate):
    x = randn(keys[0], 2**8, 2**10)
    y, (gx,) = unit_grads(lambda x: ops.dropout(x, rate, rng=keys[1]), x)
    assert_unit(y, gx)


def test_norms(keys):
    x, w, b = randn(keys[0], 2**8, 2**10), jnp.ones(2**10), jnp.zeros(2**10)  # init values
    y, (gx, gw, gb) = unit_grads(ops.layer_norm, x, w, b)
    assert_unit(y, gx, gw, gb)
    y, (gx, gw) = unit_grads(ops.rms_norm, x, w)
    assert_unit(y, gx, gw)


def test_embedding(keys):
    ids = jax.random.randint(keys[0], (2**4, 2**5), 0, 2**12)
    table = randn(keys[1], 2**12, 2**6)
    y, (gt,) = unit_grads(lambda t: ops.embedding(ids, t), table)
    assert_unit(y, gt)


def test_attention(keys):
    # [batch, seq, heads, head_dim] = [1, 2^8, 2^2, 2^6]; flat attention at init.
    q, k, v = (randn(kk, 1, 2**8, 4, 2**6) for kk in keys[:3])
    y, (gq, gk, gv) = unit_grads(ops.scaled_dot_product_attention, q, k, v)
    assert_unit(y, gv)
    for g in (gq, gk):  # q, k gradients are attenuated by the flat softmax, ~ d_head^-1/2
        assert abs(std(g) * 2**3 - 1) <= 0.2, std(g)


def test_cross_entropy(keys):
    logits = randn(keys[0], 2**12, 2**8)
    labels = jax.random.randint(keys[1], (2**12,), 0, 2**8)
    loss, g = jax.value_and_grad(ops.cross_entropy)(logits, labels)
    ref = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))
    assert jnp.allclose(loss, ref, rtol=1e-6)
    assert_unit(g)


def test_mse(keys):
    p, t = randn(keys[0], 2**8, 2**10), randn(keys[1], 2**8, 2**10)
    gp, gt = jax.grad(ops.mse_loss, argnums=(0, 1))(p, t)
    assert_unit(gp, gt)


@pytest.mark.parametrize("tau", [0.2, 1.0, 3.0])
def test_residual(keys, tau):
    x, w = randn(keys[0], 2**8, 2**10), randn(keys[1], 2**10, 2**10)
    y, (gx, gw) = unit_grads(
        lambda x, w: ops.residual_apply(lambda r: ops.linear(r, w, constraint=None), x, tau), x, w)
    assert_unit(y, gx, gw)
