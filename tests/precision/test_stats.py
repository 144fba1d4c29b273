"""format_stats: underflow / saturation / subnormal fractions per tensor."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from unitscale_jax.precision import (
    E4M3,
    E5M2,
    FP16,
    format_stats,
    saturation_fraction,
    simulate,
    tree_format_stats,
    underflow_fraction,
)


def test_counts_on_crafted_values():
    s = E4M3.min_subnormal
    x = jnp.array([0.0, s / 2, -s / 4, 0.6 * s, 0.01, 1.0, 448.0, 500.0, -1e9, jnp.nan])
    st = format_stats(x, E4M3)
    np.testing.assert_allclose(
        np.asarray(st), np.array([2, 2, 2, 1, 1]) / 10, rtol=1e-7
    )
    assert underflow_fraction(x, E4M3) == np.float32(0.2)
    assert saturation_fraction(x, "e4m3fn") == np.float32(0.2)


def test_underflow_agrees_with_simulate():
    x = jax.random.normal(jax.random.key(0), (4096,)) * 1e-4
    for fmt in (E4M3, E5M2, FP16):
        q = simulate(x, fmt)
        flushed = jnp.mean((x != 0) & (q == 0))
        assert float(underflow_fraction(x, fmt)) == float(flushed)
        assert (float(saturation_fraction(x * 1e9, fmt))
                == float(jnp.mean(jnp.abs(x * 1e9) > fmt.max)))


def test_unit_scale_fits_fp8_but_small_scale_underflows():
    unit = jax.random.normal(jax.random.key(1), (1 << 14,))
    assert float(underflow_fraction(unit, E4M3)) < 1e-3
    assert float(saturation_fraction(unit, E4M3)) == 0.0
    tiny = unit * 2.0**-14  # e.g. an unscaled gradient
    assert float(underflow_fraction(tiny, E4M3)) > 0.99


def test_tree_jit_and_bf16():
    tree = {"a": jnp.ones((3,)) * 1e-9, "b": (jnp.full((2,), 1e6, jnp.bfloat16),),
            "n": jnp.arange(3)}
    st = jax.jit(lambda t: tree_format_stats(t, E4M3))(tree)
    assert float(st["a"].underflow) == 1.0 and float(st["b"][0].saturation) == 1.0
    assert st["n"] is None
    chex.assert_trees_all_equal(format_stats(jnp.zeros((0,)), E4M3).underflow, jnp.float32(0))
