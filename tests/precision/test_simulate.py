"""simulate(): bit-exact against ml_dtypes casts, saturation, subnormals, stochastic rounding."""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from unitscale_jax.precision import BF16, E4M3, E4M3_FNUZ, E5M2, E5M2_FNUZ, FP16, FP32, simulate
from unitscale_jax.precision.formats import FloatFormat

from ._probes import NAMED_FORMATS, all_finite_values, probe_values

_sim = jax.jit(simulate, static_argnums=1)


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("fmt", NAMED_FORMATS, ids=str)
def test_nearest_is_bit_exact_vs_ml_dtypes_float32(fmt):
    x = probe_values(fmt)
    expected = x.astype(fmt.dtype).astype(np.float32)
    got = np.asarray(_sim(x, fmt))
    bad = _bits(got) != _bits(expected)
    assert not bad.any(), (x[bad][:5], expected[bad][:5], got[bad][:5])


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E4M3_FNUZ, E5M2_FNUZ], ids=str)
@pytest.mark.parametrize("in_dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "fp16"])
def test_nearest_is_bit_exact_for_low_precision_inputs(fmt, in_dtype):
    x = probe_values(fmt, seed=1).astype(in_dtype)
    # ml_dtypes rounds the (exact) float32 value of each input.
    expected = np.asarray(x).astype(np.float32).astype(fmt.dtype).astype(in_dtype)
    got = simulate(jnp.asarray(x), fmt)
    assert got.dtype == jnp.dtype(in_dtype)
    np.testing.assert_array_equal(np.asarray(got).view(np.uint16), expected.view(np.uint16))


@pytest.mark.parametrize("fmt", NAMED_FORMATS, ids=str)
def test_grid_points_are_fixed_points(fmt):
    grid = all_finite_values(fmt)
    np.testing.assert_array_equal(_bits(_sim(grid, fmt)), _bits(grid))


@pytest.mark.parametrize("fmt", NAMED_FORMATS, ids=str)
def test_saturates_instead_of_nan_or_inf(fmt):
    if fmt is BF16:
        x = np.array([3.395e38, 3.4e38, -3.4e38], np.float32)
    else:
        x = np.array([fmt.max * 1.0001, -fmt.max * 1.5, 3e38, -3e38, fmt.max * 1.03], np.float32)
    got = np.asarray(_sim(x, fmt))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(np.abs(got), np.full(x.shape, fmt.max, np.float32))
    np.testing.assert_array_equal(np.sign(got), np.sign(x))


@pytest.mark.parametrize("fmt", NAMED_FORMATS, ids=str)
def test_nan_and_inf_pass_through(fmt):
    x = np.array([np.nan, np.inf, -np.inf, 1.0], np.float32)
    got = np.asarray(_sim(x, fmt))
    assert np.isnan(got[0]) and got[1] == np.inf and got[2] == -np.inf and got[3] == 1.0


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E4M3_FNUZ, E5M2_FNUZ, FP16], ids=str)
def test_subnormals_and_flush(fmt):
    s = fmt.min_subnormal
    x = np.array([s, 3 * s, 0.5 * s, 0.5000001 * s, 0.4999 * s, 1.5 * s, 2.5 * s,
                  fmt.min_normal - s / 4, 1e-30, -0.5 * s], np.float32)
    want = np.array([s, 3 * s, 0, s, 0, 2 * s, 2 * s, fmt.min_normal, 0, 0], np.float32)
    got = np.asarray(_sim(x, fmt))
    np.testing.assert_array_equal(np.abs(got), want)
    # Negative values that flush keep their sign only where -0 exists.
    assert np.signbit(got[-1]) == fmt.has_negative_zero


def test_bf16_subnormals_exact_in_integer_arithmetic():
    # bf16 subnormals are float32 denormals; the integer path must not flush them.
    x = np.array([9.2e-41, 1.5e-40, -2.3e-39, 1e-45], np.float32)
    expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(_bits(_sim(x, BF16)), _bits(expected))


def test_fp32_is_identity_and_custom_format():
    x = jnp.array([1.2345678, 1e-42, 3e38])
    assert simulate(x, FP32) is x
    e3m2 = FloatFormat("e3m2", 3, 2, 3, "ieee")  # max 14, min normal 0.25, min subnormal 1/16
    got = simulate(jnp.array([15.0, 0.3, 0.03, 0.04, 1.1, 1.125]), e3m2)
    np.testing.assert_array_equal(np.asarray(got), [14.0, 0.3125, 0.0, 0.0625, 1.0, 1.0])


def _neighbours(x, fmt):
    grid = all_finite_values(fmt).astype(np.float64)
    idx = np.searchsorted(grid, x, side="right") - 1
    lo = grid[np.clip(idx, 0, len(grid) - 1)]
    hi = grid[np.clip(idx + 1, 0, len(grid) - 1)]
    hi = np.where(lo == x, lo, hi)
    return lo, hi


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E4M3_FNUZ, FP16, BF16], ids=str)
def test_stochastic_gives_a_neighbour(fmt):
    x = probe_values(fmt, seed=2, n_random=3000)
    got = np.asarray(
        jax.jit(lambda v, k: simulate(v, fmt, rounding="stochastic", rng=k))(x, jax.random.key(0)),
        np.float64,
    )
    lo, hi = _neighbours(x.astype(np.float64), fmt)
    ok = (got == lo) | (got == hi)
    assert ok.all(), (x[~ok][:5], got[~ok][:5], lo[~ok][:5], hi[~ok][:5])


@pytest.mark.parametrize("fmt", [E4M3, E5M2_FNUZ, FP16], ids=str)
def test_stochastic_is_unbiased(fmt):
    # Normal, subnormal and near-max values; each averaged over many seeds.
    s, n = fmt.min_subnormal, 4000
    rs = np.random.default_rng(3)
    x = np.concatenate([
        rs.uniform(1, 2, 8) * rs.choice([1, -1], 8),
        rs.uniform(0, fmt.min_normal, 8),
        [fmt.max * 0.99, 0.25 * s, 0.75 * s, 1.25 * s, 1 + 2.0 ** -(fmt.mantissa_bits + 2)],
    ]).astype(np.float32)
    keys = jax.random.split(jax.random.key(1), n)
    draws = jax.jit(jax.vmap(
        lambda k: simulate(jnp.asarray(x), fmt, rounding="stochastic", rng=k)))(keys)
    lo, hi = _neighbours(x.astype(np.float64), fmt)
    mean = np.asarray(draws, np.float64).mean(0)
    tol = 5 * (hi - lo) / 2 / np.sqrt(n) + 1e-12
    assert (np.abs(mean - x) <= tol).all(), (x, mean, tol)
    # 1 + 2^-(m+2) lies a quarter of the spacing above 1: rounds up ~25% of the time.
    frac_up = float(np.mean(np.asarray(draws[:, -1]) > 1.0))
    assert abs(frac_up - 0.25) < 5 * np.sqrt(0.25 * 0.75 / n)


def test_stochastic_seeded_and_reproducible():
    x = jax.random.normal(jax.random.key(5), (256,))
    a = simulate(x, E4M3, rounding="stochastic", rng=jax.random.key(7))
    b = simulate(x, E4M3, rounding="stochastic", rng=jax.random.key(7))
    c = simulate(x, E4M3, rounding="stochastic", rng=jax.random.key(8))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    legacy = simulate(x, E4M3, rounding="stochastic", rng=jax.random.PRNGKey(7))  # raw uint32 key
    chex.assert_trees_all_equal(legacy, simulate(legacy, E4M3))
    # Stochastic rounding saturates too.
    big = simulate(jnp.array([1e6, -1e6]), E4M3, rounding="stochastic", rng=jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(big), [448.0, -448.0])


def test_vmap_and_jit_match_eager():
    x = jax.random.normal(jax.random.key(0), (4, 33)) * 100
    eager = simulate(x, E5M2)
    chex.assert_trees_all_equal(jax.vmap(lambda r: simulate(r, E5M2))(x), eager)
    chex.assert_trees_all_equal(_sim(x, E5M2), eager)


def test_errors():
    with pytest.raises(ValueError, match="needs rng"):
        simulate(jnp.ones(3), E4M3, rounding="stochastic")
    with pytest.raises(ValueError, match="only used"):
        simulate(jnp.ones(3), E4M3, rng=jax.random.key(0))
    with pytest.raises(ValueError, match="rounding must be"):
        simulate(jnp.ones(3), E4M3, rounding="up")
    with pytest.raises(TypeError, match="floating-point"):
        simulate(jnp.ones(3, jnp.int32), E4M3)
    with pytest.raises(TypeError, match="not differentiable"):
        jax.grad(lambda v: simulate(v, E4M3).sum())(jnp.ones(3))
    # Through stop_gradient it is fine (zero gradient by construction).
    g = jax.grad(lambda v: simulate(jax.lax.stop_gradient(v), E4M3).sum() + v.sum())(jnp.ones(3))
    np.testing.assert_array_equal(np.asarray(g), np.ones(3))
