"""quantise_fwd / quantise_bwd / quantise: which direction is rounded, under jit/grad/vmap."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax.precision import E4M3, E5M2, FP16, quantise, quantise_bwd, quantise_fwd, simulate

X = jnp.array([0.1234567, -3.3333, 1000.0, 1e-5, 2.71828])
G = jnp.array([1e-3, -7.77777, 1e6, 3e-8, 0.3])


def _vjp(f, x, g):
    y, pullback = jax.vjp(f, x)
    return y, pullback(g)[0]


def test_quantise_fwd_rounds_value_only():
    y, dx = _vjp(lambda v: quantise_fwd(v, E4M3), X, G)
    chex.assert_trees_all_equal(y, simulate(X, E4M3))
    chex.assert_trees_all_equal(dx, G)


def test_quantise_bwd_rounds_gradient_only():
    y, dx = _vjp(lambda v: quantise_bwd(v, E5M2), X, G)
    chex.assert_trees_all_equal(y, X)
    chex.assert_trees_all_equal(dx, simulate(G, E5M2))
    assert float(dx[2]) == E5M2.max  # gradient overflow saturates, no inf


def test_quantise_both_directions_and_value_and_grad():
    f = lambda v: jnp.sum(quantise(v, E4M3, E5M2) * G)  # noqa: E731
    val, dx = jax.jit(jax.value_and_grad(f))(X)
    np.testing.assert_allclose(val, jnp.sum(simulate(X, E4M3) * G), rtol=1e-6)
    chex.assert_trees_all_equal(dx, simulate(G, E5M2))


def test_none_and_fp32_are_identity():
    assert quantise_fwd(X, None) is X
    assert quantise_bwd(X, "fp32") is X


def test_chain_rule_through_quantise_bwd():
    # d/dx of sum(quantise_bwd(3x)^2) = 3 * simulate(2 * 3x)
    g = jax.grad(lambda v: jnp.sum(quantise_bwd(3 * v, E4M3) ** 2))(X)
    chex.assert_trees_all_close(g, 3 * simulate(6 * X, E4M3), rtol=1e-6)


def test_vmap_grad_and_bf16_inputs():
    xb = jnp.tile(X, (3, 1)).astype(jnp.bfloat16)
    gb = jnp.tile(G, (3, 1)).astype(jnp.bfloat16)
    f = jax.vmap(lambda v, g: _vjp(lambda u: quantise(u, E4M3, E5M2), v, g))
    y, dx = f(xb, gb)
    assert y.dtype == jnp.bfloat16 and dx.dtype == jnp.bfloat16
    chex.assert_trees_all_equal(y, simulate(xb, E4M3))
    chex.assert_trees_all_equal(dx, simulate(gb, E5M2))


def test_stochastic_directions_use_rng():
    key = jax.random.key(0)
    x = jax.random.normal(jax.random.key(1), (512,))
    g = jax.random.normal(jax.random.key(2), (512,))
    y, dx = _vjp(lambda v: quantise_fwd(v, E4M3, rounding="stochastic", rng=key), x, g)
    chex.assert_trees_all_equal(y, simulate(x, E4M3, rounding="stochastic", rng=key))
    chex.assert_trees_all_equal(dx, g)
    y, dx = _vjp(lambda v: quantise_bwd(v, E5M2, rounding="stochastic", rng=key), x, g)
    chex.assert_trees_all_equal(y, x)
    chex.assert_trees_all_equal(dx, simulate(g, E5M2, rounding="stochastic", rng=key))
    # quantise() splits the key: its two roundings are independent of each other.
    kf, kb = jax.random.split(key)
    y, dx = jax.jit(lambda v, k: _vjp(
        lambda u: quantise(u, E4M3, E5M2, rounding="stochastic", rng=k), v, g))(x, key)
    chex.assert_trees_all_equal(y, simulate(x, E4M3, rounding="stochastic", rng=kf))
    chex.assert_trees_all_equal(dx, simulate(g, E5M2, rounding="stochastic", rng=kb))


def test_errors():
    with pytest.raises(ValueError, match="needs rng"):
        quantise_fwd(X, FP16, rounding="stochastic")
    with pytest.raises(TypeError, match="floating-point"):
        quantise_bwd(jnp.arange(3), FP16)
    with pytest.raises(ValueError, match="Unknown format"):
        quantise(X, "e4m4", "e5m2")
