"""fp8_dot: real float8 operands in all three matmuls, equal to the simulated path on CPU."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax.precision import (
    E4M3,
    E4M3_FNUZ,
    E5M2,
    E5M2_FNUZ,
    fp8_dot,
    quantise_bwd,
    quantise_fwd,
)


def _sim_dot(x, w, fwd=E4M3, bwd=E5M2, xs=1.0, ws=1.0, gs=1.0):
    xq = quantise_fwd(x.astype(jnp.float32) * xs, fwd) / xs
    wq = quantise_fwd(w.astype(jnp.float32) * ws, fwd) / ws
    y = jnp.matmul(xq, wq, precision="highest")
    # Backward: the incoming gradient is multiplied by gs, rounded, then divided by gs.
    return quantise_bwd(y / gs, bwd) * gs


def _data(shape_x=(2, 6, 32), n=24, wstd=1.0):
    x = jax.random.normal(jax.random.key(0), shape_x)
    w = jax.random.normal(jax.random.key(1), (shape_x[-1], n)) * wstd
    g = jax.random.normal(jax.random.key(2), shape_x[:-1] + (n,))
    return x, w, g


def _value_and_grads(f, x, w, g):
    y, pullback = jax.vjp(f, x, w)
    return (y, *pullback(g.astype(y.dtype)))


@pytest.mark.parametrize("scales", [(1.0, 1.0, 1.0), (4.0, 0.25, 1024.0)])
@pytest.mark.parametrize("fmts", [(E4M3, E5M2), (E4M3_FNUZ, E5M2_FNUZ)], ids=["ocp", "fnuz"])
def test_fp8_dot_matches_simulation(scales, fmts):
    x, w, g = _data(wstd=3.0)
    g = g * 1e-3  # small gradients: grad_scale matters for E5M2 resolution
    xs, ws, gs = scales
    real = jax.jit(lambda a, b: fp8_dot(a, b, x_scale=xs, w_scale=ws, grad_scale=gs,
                                        fwd_dtype=fmts[0].dtype, bwd_dtype=fmts[1].dtype))
    got = _value_and_grads(real, x, w, g)
    want = _value_and_grads(lambda a, b: _sim_dot(a, b, *fmts, xs, ws, gs), x, w, g)
    for a, b in zip(got, want):
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)
    # And it is a genuine (coarse) approximation of the exact matmul.
    exact = jnp.matmul(x, w, precision="highest")
    err = float(jnp.abs(got[0] - exact).max() / jnp.abs(exact).max())
    assert 1e-4 < err < 0.1


def test_hlo_has_float8_operands_forward_and_backward():
    x, w, g = _data()
    fwd_text = jax.jit(lambda a, b: fp8_dot(a, b)).lower(x, w).as_text()
    assert "f8E4M3FN>" in fwd_text and "dot_general" in fwd_text
    assert "xf8E4M3FN>, tensor<32x24xf8E4M3FN>) -> tensor<2x6x24xf32>" in fwd_text
    bwd = jax.jit(jax.grad(lambda a, b: jnp.sum(fp8_dot(a, b) * g), argnums=(0, 1)))
    text = bwd.lower(x, w).as_text()
    dots = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
    assert len(dots) == 2, dots
    for ln in dots:
        assert "f8E5M2>" in ln and "f8E4M3FN>" in ln and "f32>" in ln


def test_saturates_instead_of_nan():
    x = jnp.full((2, 8), 1e4)
    w = jnp.full((8, 3), -1e3)
    y, dx, dw = _value_and_grads(lambda a, b: fp8_dot(a, b), x, w, jnp.full((2, 3), 1e6))
    for t in (y, dx, dw):
        assert bool(jnp.isfinite(t).all())
    np.testing.assert_allclose(np.asarray(y), -448.0 * 448.0 * 8)
    np.testing.assert_allclose(np.asarray(dx), -57344.0 * 448.0 * 3)


def test_bf16_inputs_and_output_dtype():
    x, w, g = _data()
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    y, dx, dw = _value_and_grads(lambda a, b: fp8_dot(a, b), xb, wb, g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
    y32 = fp8_dot(xb, wb, preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32
    chex.assert_trees_all_close(y, y32.astype(jnp.bfloat16), rtol=1e-2)
    chex.assert_trees_all_close(y32, _sim_dot(xb, wb), rtol=1e-5, atol=1e-5)


def test_vmap_and_2d():
    x, w, _ = _data((3, 16), 8)
    batched = jax.vmap(lambda r: fp8_dot(r, w))(x)
    chex.assert_trees_all_close(batched, fp8_dot(x, w), rtol=1e-6)
    grad = jax.grad(lambda r, v: jnp.sum(fp8_dot(r, v) ** 2), argnums=(0, 1))
    dx_rows, dw_rows = jax.vmap(grad, in_axes=(0, None))(x, w)
    dx, dw = grad(x, w)
    chex.assert_trees_all_close((dx_rows, dw_rows.sum(0)), (dx, dw), rtol=1e-5, atol=1e-5)


def test_errors():
    x, w, _ = _data()
    with pytest.raises(ValueError, match=r"w \[K, N\]"):
        fp8_dot(x, w.T)
    with pytest.raises(TypeError, match="static Python float"):
        jax.jit(lambda a, b, s: fp8_dot(a, b, x_scale=s))(x, w, 2.0)
    with pytest.raises(ValueError, match="positive"):
        fp8_dot(x, w, w_scale=0.0)
    with pytest.raises(ValueError, match="preferred_element_type"):
        fp8_dot(x, w, preferred_element_type=jnp.float8_e4m3fn)
