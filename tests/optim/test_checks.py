"""unitscale_jax.optim.checks: the invariant checks pass when they should and fail when they should,
eagerly and under jit through chex.chexify."""

import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from unitscale_jax.nn import ParamInfo
from unitscale_jax.optim import _pow2, adam, checks, unit_scale


def _chexified(fn):
    return checks.jit_checked(fn)


def test_chex_chexify_directly():
    check = chex.chexify(jax.jit(checks.assert_unit_rms))
    check({"a": jnp.ones(3)})
    chex.block_until_chexify_assertions_complete()
    check = chex.chexify(jax.jit(checks.assert_unit_rms), async_check=False)
    with pytest.raises(AssertionError, match="assert_trees_all_close"):
        check({"a": jnp.full((3,), 2.0)})


def test_jit_checked_leaves_no_false_exit_warning():
    """chex warns at exit about uninspected statuses for every chexified function, even
    synchronous ones; jit_checked's have nothing pending, so a script using them exits quietly
    (while importing the checks alone leaves an asynchronous chexify's warning in place)."""
    code = ("import jax.numpy as jnp, chex, jax; from unitscale_jax.optim import checks; {body}")
    root = Path(__file__).resolve().parents[2]
    run = lambda body: subprocess.run(  # noqa: E731
        [sys.executable, "-c", code.replace("{body}", body)], capture_output=True, text=True,
        cwd=root, timeout=120, check=True)
    assert "not inspected" not in run(
        "checks.jit_checked(checks.assert_unit_rms)({'a': jnp.ones(3)})").stderr
    assert "not inspected" in run("chex.chexify(jax.jit(checks.assert_unit_rms))"
                                  "({'a': jnp.ones(3)})").stderr


def test_rms_is_exact_under_power_of_two_scaling_across_the_float32_range():
    x = jax.random.normal(jax.random.key(0), (257,))
    r0 = _pow2.rms(x)
    np.testing.assert_allclose(r0, np.sqrt(np.mean(np.asarray(x, np.float64) ** 2)), rtol=1e-6)
    for k in (-100, -64, -20, -1, 1, 20, 64, 100):  # inputs stay normal floats
        assert _pow2.rms(x * 2.0 ** k) == r0 * 2.0 ** k, k   # bit-for-bit
    naive = jnp.sqrt(jnp.mean((x * 2.0 ** -70) ** 2))        # squares underflow float32
    assert float(naive) == 0.0 and float(_pow2.rms(x * 2.0 ** -70)) > 0
    assert float(_pow2.rms(jnp.zeros(3))) == 0.0 and float(_pow2.rms(jnp.zeros((0,)))) == 0.0
    assert np.isnan(_pow2.rms(jnp.array([1.0, jnp.nan])))
    assert _pow2.weighted_rms(jnp.float32(3.0), jnp.float32(4.0), 0.5) == pytest.approx(12.5 ** 0.5)



def test_rms_with_guess_one_pass_matches_rms_and_keeps_invariance():
    x = jax.random.normal(jax.random.key(0), (257,)) * 3e-4
    exact = _pow2.rms(x)
    f = jax.jit(_pow2.rms_with_guess)
    # guesses off by up to 2^25 either way take the one-pass path and agree to rounding
    for k in (-25, -3, 0, 1, 7, 25):
        got = f(x, exact * 2.0 ** k, True)
        np.testing.assert_allclose(got, exact, rtol=2e-7)
        for s in (-20, -1, 13, 20):                      # x and guess scaled together: bit-for-bit
            assert f(x * 2.0 ** s, exact * 2.0 ** (k + s), True) == got * 2.0 ** s, (k, s)
    # unusable guesses fall back to the exact two-pass rms (same value, bit-for-bit)
    for guess, use in ((exact * 2.0 ** 40, True), (exact * 2.0 ** -40, True), (0.0, True),
                       (jnp.inf, True), (jnp.nan, True), (exact, False)):
        assert f(x, jnp.float32(guess), use) == exact, (guess, use)
    assert float(f(jnp.zeros(5), 1.0, True)) == 0.0
    assert np.isnan(f(jnp.array([1.0, jnp.nan]), 1.0, True))
    assert np.isinf(f(jnp.array([1.0, jnp.inf]), 1.0, True))
    # huge elements whose squares overflow after a stale guess: the fallback gets it right
    big = jnp.array([3e37, -3e37, 1.0])
    np.testing.assert_allclose(f(big, 1e-3, True), _pow2.rms(big), rtol=1e-7)
    assert np.isfinite(f(big, 1e-3, True))


@pytest.mark.parametrize("mode", ["eager", "chexify"])
def test_assert_unit_rms(mode):
    check = checks.assert_unit_rms if mode == "eager" else _chexified(checks.assert_unit_rms)
    x = jax.random.normal(jax.random.key(0), (64,))
    good = {"a": x / _pow2.rms(x), "zero": jnp.zeros(4), "v": nnx.Param(jnp.ones(3))}
    check(good)
    with pytest.raises(AssertionError):
        check({**good, "a": 1.01 * good["a"]})
    with pytest.raises(AssertionError):
        check({"nan": jnp.array([1.0, jnp.nan])})


@pytest.mark.parametrize("mode", ["eager", "chexify"])
def test_assert_finite_updates(mode):
    check = checks.assert_finite_updates if mode == "eager" else _chexified(
        checks.assert_finite_updates)
    g = {"a": jnp.ones(3)}
    check(g, {"a": jnp.ones(3)})
    check({"a": jnp.array([1.0, jnp.inf, 0.0])}, {"a": jnp.array([jnp.nan, 1.0, 1.0])})
    with pytest.raises(AssertionError):
        check(g, {"a": jnp.array([1.0, jnp.inf, 0.0])})


@pytest.mark.parametrize("mode", ["eager", "chexify"])
def test_assert_umup_first_step(mode):
    info = {"w": ParamInfo("weight", 64, 4), "o": ParamInfo("output", 8)}
    g = {"w": jax.random.normal(jax.random.key(0), (64, 8)),
         "o": jax.random.normal(jax.random.key(1), (8, 3))}
    tx = adam(0.5, param_info=info, eps=1e-30)
    u, _ = tx.update(g, tx.init(g), g)

    def fn(u):
        checks.assert_umup_first_step(u, info, 0.5)

    check = fn if mode == "eager" else _chexified(fn)
    check(u)
    with pytest.raises(AssertionError):
        check({"w": u["w"], "o": 2 * u["o"]})
    with pytest.raises(AssertionError):  # one element off is enough
        check({"w": u["w"].at[3, 3].multiply(1.1), "o": u["o"]})


def test_assert_loss_scale_invariant_under_jit():
    g = {"a": 1e-3 * jax.random.normal(jax.random.key(0), (16, 4)), "b": jnp.full((4,), 7.0)}
    p = jax.tree.map(jnp.zeros_like, g)

    def invariant(tx):  # default rtol (a few ulps): see assert_loss_scale_invariant
        return _chexified(lambda g, p: checks.assert_loss_scale_invariant(tx, g, p, num_steps=2))

    invariant(optax.chain(unit_scale(decay=0.5), optax.sgd(0.1, momentum=0.9)))(g, p)
    with pytest.raises(AssertionError):
        invariant(optax.sgd(0.1))(g, p)


def test_loss_scaled_updates_shapes_and_errors():
    g = {"a": jnp.ones((3, 2))}
    u, p = checks.loss_scaled_updates(unit_scale(), [g, g], g, exponents=(-1, 0, 5), num_steps=2)
    assert u["a"].shape == (3, 3, 2) and p["a"].shape == (3, 3, 2)
    with pytest.raises(ValueError, match="num_steps=3"):
        checks.loss_scaled_updates(unit_scale(), [g, g], g, num_steps=3)
