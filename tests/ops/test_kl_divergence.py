"""The distillation loss ``ops.kl_divergence``: its value against the plain core, its
gradient against the unscaled reference times ``beta``, unit scale at init, the temperature,
the one-hot teacher (``cross_entropy``) limit and bad input."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax import nn, ops
from unitscale_jax.ops import plain

V = 11


def _rand(seed, shape, scale=1.0):
    return scale * jax.random.normal(jax.random.key(seed), shape)


def _reference(s, t, temperature):
    """``T^2 * mean KL(softmax(t/T) || softmax(s/T))`` written out with probabilities."""
    p_t = jax.nn.softmax(t / temperature)
    p_s = jax.nn.softmax(s / temperature)
    return temperature ** 2 * jnp.mean(jnp.sum(p_t * (jnp.log(p_t) - jnp.log(p_s)), -1))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_plain_matches_the_written_out_definition(temperature):
    s, t = _rand(0, (4, 5, V)), _rand(1, (4, 5, V), 2.0)
    loss, g = jax.value_and_grad(lambda x: plain.kl_divergence(x, t, temperature=temperature))(s)
    ref, g_ref = jax.value_and_grad(lambda x: _reference(x, t, temperature))(s)
    chex.assert_trees_all_close(loss, ref, rtol=1e-5)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-7)
    # d/ds of T^2 KL is T (p_s - p_t) / B: the T^2 keeps soft-target gradients comparable
    p_s, p_t = jax.nn.softmax(s / temperature), jax.nn.softmax(t / temperature)
    chex.assert_trees_all_close(g, temperature * (p_s - p_t) / 20, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("temperature,mult", [(1.0, 1.0), (2.0, 1.0), (0.5, 2.0)])
def test_scaled_is_the_reference_times_beta(temperature, mult):
    s, t = _rand(2, (4, 5, V)), _rand(3, (4, 5, V), 3.0)
    loss, g = jax.value_and_grad(
        lambda x: ops.kl_divergence(x, t, temperature=temperature, mult=mult))(s)
    ref, g_ref = jax.value_and_grad(
        lambda x: plain.kl_divergence(mult * x, t, temperature=temperature))(s)
    chex.assert_trees_all_close(loss, ref, rtol=1e-5)
    beta = 20 * V / ((V - 1) ** 0.5 * temperature * mult)
    chex.assert_trees_all_close(g, beta * g_ref, rtol=1e-4, atol=1e-6)
    # the same with a mask: the masked positions get no gradient, the mean is over the rest
    where = jnp.arange(20).reshape(4, 5) % 3 != 0
    loss_w, g_w = jax.value_and_grad(lambda x: ops.kl_divergence(
        x, t, temperature=temperature, mult=mult, where=where))(s)
    ref_w, g_ref_w = jax.value_and_grad(lambda x: plain.kl_divergence(
        mult * x, t, temperature=temperature, where=where))(s)
    chex.assert_trees_all_close(loss_w, ref_w, rtol=1e-5)
    n = int(jnp.sum(where))
    chex.assert_trees_all_close(g_w, beta * n / 20 * g_ref_w, rtol=1e-4, atol=1e-6)
    assert float(jnp.max(jnp.abs(jnp.where(where[..., None], 0.0, g_w)))) == 0.0


@pytest.mark.parametrize("par", ["umup", "sp"])
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(par):
    s = _rand(4, (3, 7, V), 3.0)
    kl = nn.get_parametrization(par).kl_divergence
    for temperature in (0.5, 1.0, 3.0):
        loss, g = jax.value_and_grad(lambda x: kl(x, s, temperature=temperature))(s)
        assert float(loss) == pytest.approx(0.0, abs=1e-6)
        assert float(jnp.max(jnp.abs(g))) < 1e-6
    # and the teacher never receives a gradient
    g_t = jax.grad(lambda t: ops.kl_divergence(s + 1.0, t, temperature=2.0), argnums=0)(s)
    assert float(jnp.max(jnp.abs(g_t))) == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_one_hot_teacher_is_cross_entropy(temperature):
    """A teacher sure of one class is the cross-entropy: value T^2 * CE(s, mult=1/T) and the
    very same gradient (cross_entropy's scaling rule)."""
    s = _rand(5, (4, 5, V))
    labels = jax.random.randint(jax.random.key(6), (4, 5), 0, V)
    one_hot = 1e4 * jax.nn.one_hot(labels, V)  # softmax(one_hot / T) is one-hot in float32
    loss, g = jax.value_and_grad(lambda x: ops.kl_divergence(x, one_hot,
                                                             temperature=temperature))(s)
    ce, g_ce = jax.value_and_grad(lambda x: ops.cross_entropy(x, labels,
                                                              mult=1 / temperature))(s)
    chex.assert_trees_all_close(loss, temperature ** 2 * ce, rtol=1e-5)
    chex.assert_trees_all_close(g, g_ce, rtol=1e-5, atol=1e-6)


def test_student_gradient_is_unit_scale_at_init():
    """A u-muP student at init (unit logits through the readout's 1/fan_in: near-uniform
    predictions) and a confident teacher: the logit gradient has std 1, as cross_entropy's;
    a softer teacher gives less, never more. The unscaled reference's is beta = B V /
    sqrt(V - 1) times smaller."""
    b, vocab, width = 2**10, 2**8, 2**7
    h, w = _rand(7, (b, width)), _rand(8, (width, vocab))
    student = ops.linear_readout(h, w)  # the u-muP readout's logits at init
    confident = _rand(9, (b, vocab), 30.0)
    soft = _rand(10, (b, vocab), 1.0)
    for temperature in (1.0, 2.0):
        g = jax.grad(lambda x: ops.kl_divergence(x, confident, temperature=temperature))(student)
        assert abs(float(jnp.std(g)) - 1) < 0.1, (temperature, float(jnp.std(g)))
    # unit teacher logits at T = 2: p_t ~ u (1 + t / T), the residual ~ t / (T V), so the
    # gradient's std is ~ 1 / (T sqrt(V)) = 1/32, below unit
    g_soft = jax.grad(lambda x: ops.kl_divergence(x, soft, temperature=2.0))(student)
    assert abs(float(jnp.std(g_soft)) * 2 * vocab ** 0.5 - 1) < 0.15, float(jnp.std(g_soft))
    g_ref = jax.grad(lambda x: plain.kl_divergence(x, confident))(student)
    beta = b * vocab / (vocab - 1) ** 0.5
    assert abs(float(jnp.std(g_ref)) * beta - 1) < 0.1, float(jnp.std(g_ref))


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.kl_divergence(jnp.ones((2, 5)), jnp.ones((2, 4))), ValueError, "shape"),
    (lambda: ops.kl_divergence(jnp.ones((2, 5)), jnp.ones((2, 5)), temperature=0.0),
     ValueError, "temperature must be a finite number > 0"),
    (lambda: ops.kl_divergence(jnp.ones((2, 5)), jnp.ones((2, 5)), temperature=-1.0),
     ValueError, "> 0"),
    (lambda: plain.kl_divergence(jnp.ones((2, 5)), jnp.ones((2, 5)), temperature=np.inf),
     ValueError, "finite"),
    (lambda: ops.kl_divergence(jnp.ones((2, 5)), jnp.ones((2, 5)),
                               temperature=jnp.float32(2)), TypeError, "static"),
    (lambda: ops.kl_divergence(jnp.ones((2, 5)), jnp.ones((2, 5), jnp.int32)), TypeError,
     "floating-point"),
    (lambda: ops.kl_divergence(jnp.ones((2, 1)), jnp.ones((2, 1))), ValueError, "2 classes"),
    (lambda: ops.kl_divergence(jnp.ones((2, 5)), jnp.ones((2, 5)), where=jnp.ones(3, bool)),
     ValueError, "where"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()
