"""PrecisionPolicy: presets, the module hook methods, overrides, real vs simulated FP8."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax import ops
from unitscale_jax.precision import (
    BF16,
    E4M3,
    E5M2,
    PRESETS,
    ROLES,
    UMUP_LARGE_RUN_OVERRIDES,
    Override,
    PrecisionPolicy,
    get_policy,
    simulate,
)

X = jax.random.normal(jax.random.key(0), (2, 5, 32))
W = jax.random.normal(jax.random.key(1), (32, 48))
B = jax.random.normal(jax.random.key(2), (48,))
G = jax.random.normal(jax.random.key(3), (2, 5, 48))


def _vjp(f, *args):
    y, pullback = jax.vjp(f, *args)
    return (y, *pullback(G.astype(y.dtype)))


def test_presets():
    assert PRESETS == ("fp32", "bf16", "fp16", "fp8-sim", "fp8")
    p = {n: get_policy(n) for n in PRESETS}
    assert p["fp32"].is_identity and not p["bf16"].is_identity
    assert p["bf16"].compute_dtype == jnp.bfloat16 and p["fp16"].compute_dtype == jnp.float16
    assert ((p["fp8-sim"].fwd_format, p["fp8-sim"].bwd_format, p["fp8-sim"].mode)
            == (E4M3, E5M2, "sim"))
    assert (p["fp8"].fwd_format, p["fp8"].bwd_format, p["fp8"].mode) == (E4M3, E5M2, "real")
    assert p["fp8"].compute_dtype == jnp.bfloat16 and p["fp8-sim"].compute_dtype == jnp.float32
    assert all(p[n].formats(r) == (p[n].fwd_format, p[n].bwd_format)
               for n in PRESETS for r in ROLES)
    assert len({hash(v) for v in p.values()}) == len(PRESETS)


@pytest.mark.parametrize("role,op", [("ffn_up", ops.linear), ("readout", ops.linear_readout)])
def test_fp32_linear_is_the_op(role, op):
    pol = get_policy("fp32")
    got = _vjp(lambda x, w, b: pol.linear(x, w, b, role=role), X, W, B)
    want = _vjp(lambda x, w, b: op(x, w, b), X, W, B)
    chex.assert_trees_all_equal(got, want)


def _with_dot(op):
    """The op with a plain matmul plugged in (the path a policy's matmul takes)."""
    return lambda x, w, b=None, **kw: op(x, w, b, dot_general=jax.lax.dot_general, **kw)


@pytest.mark.parametrize("constraint", ["to_output_scale", None, "gmean"])
@pytest.mark.parametrize("readout", [False, True])
def test_plugged_in_dot_equals_the_fast_linear(constraint, readout):
    op = ops.linear_readout if readout else ops.linear
    got = _vjp(lambda x, w, b: _with_dot(op)(x, w, b, constraint=constraint), X, W, B)
    want = _vjp(lambda x, w, b: op(x, w, b, constraint=constraint), X, W, B)
    # the fast form scales the kernel instead of the output and sums its weight / bias
    # gradients in its own backward (float32, scaled before the cast): the same maths,
    # rounded in another order
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)


def test_fp8_sim_linear_rounds_operands_and_output_gradient():
    pol = get_policy("fp8-sim")
    y, dx, dw, db = _vjp(lambda x, w, b: pol.linear(x, w, b, role="ffn_up"), X, W, B)
    xq, wq = simulate(X, E4M3), simulate(W, E4M3)
    # Forward: the op on E4M3-rounded inputs and weights.
    y_ref, pullback = jax.vjp(lambda x, w, b: _with_dot(ops.linear)(x, w, b), xq, wq, B)
    chex.assert_trees_all_equal(y, y_ref)
    # Backward: the matmuls see the E5M2-rounded output gradient (straight through the
    # input rounding); the bias gradient is the op's, from the unrounded gradient.
    dx_ref, dw_ref, _ = pullback(simulate(G, E5M2))
    chex.assert_trees_all_close((dx, dw), (dx_ref, dw_ref), rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal(db, pullback(G)[2])
    assert not np.allclose(np.asarray(dw), np.asarray(pullback(G)[1]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("role", ["ffn_down", "readout"])
def test_real_fp8_linear_matches_simulated(role):
    sim = get_policy("fp8-sim")
    real32 = get_policy("fp8", compute_dtype=jnp.float32)
    f = lambda p: (lambda x, w, b: p.linear(x, w, b, role=role))  # noqa: E731
    got, want = _vjp(f(real32), X, W, B), _vjp(f(sim), X, W, B)
    for a, b in zip(got, want):
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
    # The bf16 preset against simulation in bf16, on bf16-representable data (otherwise the
    # fp32 -> bf16 -> fp8 double rounding of the simulated path differs in rare ties).
    sim16 = get_policy("fp8-sim", compute_dtype=jnp.bfloat16)
    xb, wb, bb = (t.astype(jnp.bfloat16).astype(jnp.float32) for t in (X, W, B))
    got, want = _vjp(f(get_policy("fp8")), xb, wb, bb), _vjp(f(sim16), xb, wb, bb)
    assert got[0].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
    for a, b in zip(got, want):
        chex.assert_trees_all_close(a.astype(jnp.float32), b.astype(jnp.float32), rtol=1e-2,
                                    atol=1e-2)


def test_real_fp8_linear_hlo_has_float8_matmuls():
    pol = get_policy("fp8")
    loss = lambda x, w: jnp.sum(pol.linear(x, w, role="ffn_up").astype(jnp.float32) * G)  # noqa: E731
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(X, W).as_text()
    dots = [ln for ln in text.splitlines() if "stablehlo.dot_general" in ln]
    assert len(dots) == 3
    assert all("f8E4M3FN>" in ln for ln in dots)
    assert sum("f8E5M2>" in ln for ln in dots) == 2


def test_dot_for_standard_parametrization_layers():
    sim, real = get_policy("fp8-sim"), get_policy("fp8", compute_dtype=jnp.float32)
    got = _vjp(lambda x, w: real.dot(x, w, "attn_qkv"), X, W)
    want = _vjp(lambda x, w: sim.dot(x, w, "attn_qkv"), X, W)
    for a, b in zip(got, want):
        chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_equal(get_policy("fp32").dot(X, W), jnp.matmul(X, W))


def test_overrides_by_role_and_layer():
    pol = get_policy("fp8-sim", overrides=UMUP_LARGE_RUN_OVERRIDES)
    assert pol.formats("attn_out") == (BF16, BF16) and pol.formats("ffn_down") == (BF16, BF16)
    assert pol.formats("ffn_up") == (E4M3, E5M2)
    y = pol.linear(X, W, role="attn_out")
    chex.assert_trees_all_equal(y, _with_dot(ops.linear)(simulate(X, BF16), simulate(W, BF16)))
    # Layer-specific: keep layer 0's FFN up projection unquantised.
    pol = get_policy("fp8-sim", overrides=[Override("ffn_up", layers=(0,))])
    assert pol.formats("ffn_up", layer=0) == (None, None)
    assert pol.formats("ffn_up", layer=1) == (E4M3, E5M2)
    chex.assert_trees_all_equal(pol.linear(X, W, role="ffn_up", layer=0), ops.linear(X, W))
    # Real mode: an unquantised role runs a compute-dtype matmul, no float8 in the graph.
    real = get_policy("fp8", overrides=[Override("readout")])
    text = jax.jit(lambda x, w: real.linear(x, w, role="readout")).lower(X, W).as_text()
    assert "f8E4M3FN" not in text and "bf16" in text


def test_attention_hooks():
    pol = get_policy("fp8-sim")
    q, k, v = pol.attention_inputs(X, 2 * X, 3 * X)
    chex.assert_trees_all_equal((q, k, v), tuple(simulate(t, E4M3) for t in (X, 2 * X, 3 * X)))
    y, dy = jax.vjp(pol.attention_output, X)[0], jax.vjp(pol.attention_output, X)[1](X * 1e-6)[0]
    chex.assert_trees_all_equal(y, X)
    chex.assert_trees_all_equal(dy, simulate(X * 1e-6, E5M2))
    # Roles q/k/v/attn can be overridden separately.
    pol = get_policy("fp8-sim", overrides=[Override("v"), Override("attn")])
    _, _, v = pol.attention_inputs(X, X, X)
    chex.assert_trees_all_equal(v, X)


def test_low_precision_compute_dtypes():
    for name, dt in (("bf16", jnp.bfloat16), ("fp16", jnp.float16)):
        pol = get_policy(name)
        y, dx, dw, db = _vjp(lambda x, w, b: pol.linear(x, w, b, role="ffn_up"), X, W, B)
        assert y.dtype == dt and dx.dtype == dw.dtype == db.dtype == jnp.float32
        want = ops.linear(X.astype(dt), W.astype(dt), B.astype(dt))
        chex.assert_trees_all_equal(y, want)
    # fp16 arithmetic really underflows: gradients below 2^-24 vanish.
    pol = get_policy("fp16")
    g = jax.grad(lambda w: jnp.sum(pol.dot(X, w).astype(jnp.float32) * 1e-9))(W)
    assert float(jnp.abs(g).max()) == 0.0


def test_stochastic_policy_needs_and_uses_rng():
    pol = get_policy("fp8-sim", rounding="stochastic")
    with pytest.raises(ValueError, match="pass rng"):
        pol.linear(X, W)
    key = jax.random.key(4)
    f = jax.jit(lambda x, w, k: pol.linear(x, w, role="ffn_up", rng=k))
    a, b, c = f(X, W, key), f(X, W, key), f(X, W, jax.random.key(5))
    chex.assert_trees_all_equal(a, b)
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    chex.assert_trees_all_close(a, ops.linear(X, W), rtol=0.2, atol=0.2)


def test_policy_is_a_static_jit_argument():
    f = jax.jit(lambda x, w, pol: pol.linear(x, w, role="ffn_up"), static_argnums=2)
    chex.assert_trees_all_equal(f(X, W, get_policy("fp8-sim")), get_policy("fp8-sim").linear(X, W))
    assert get_policy("fp8-sim") == get_policy("fp8-sim")


def test_errors():
    with pytest.raises(ValueError, match="unknown role"):
        get_policy("fp8").linear(X, W, role="ffn_upp")
    with pytest.raises(ValueError, match="unknown role"):
        Override("mlp")
    with pytest.raises(ValueError, match="mode='none' would ignore"):
        PrecisionPolicy("x", fwd_format=E4M3)
    with pytest.raises(ValueError, match="stochastic rounding is only"):
        get_policy("fp8", rounding="stochastic")
    with pytest.raises(ValueError, match="compute_dtype"):
        PrecisionPolicy("x", compute_dtype=jnp.int8)
    with pytest.raises(ValueError, match="Unknown precision preset"):
        get_policy("fp4")
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_policy("fp8").mode = "sim"


def test_dot_general_is_the_policys_matmul_and_nothing_else():
    """A policy supplies matmuls, not rules: None where only the compute dtype changes (the
    op's own fast form runs), else a dot_general for x[..., K] @ w[K, N] only."""
    assert get_policy("fp32").dot_general("ffn_up") is None
    assert get_policy("bf16").dot_general("readout") is None
    sim = get_policy("fp8-sim", overrides=[Override("ffn_up")])
    assert sim.dot_general("ffn_up") is None  # an unquantised role
    dot = sim.dot_general("attn_out")
    chex.assert_trees_all_equal(dot(X, W, (((2,), (0,)), ((), ()))), sim.dot(X, W, "attn_out"))
    with pytest.raises(ValueError, match="only x"):
        dot(X, X, (((2,), (2,)), ((), ())))
    y = ops.plain.linear(X, W, B, dot_general=dot)
    chex.assert_trees_all_equal(y, sim.dot(X, W, "attn_out") + B)
