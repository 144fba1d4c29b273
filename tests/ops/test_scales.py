"""Each op's value is the unscaled op times alpha and each gradient the unscaled gradient
times beta.

The expected scales are written out independently of the implementation, from the rules in
shared/design/unit-scaling.md, so a wrong constant in the library fails here.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax import ops

interp = lambda a, lo, hi: math.exp(a * math.log(hi) + (1 - a) * math.log(lo))  # noqa: E731


def _rand(key, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(key), shape, dtype)


def check_op(scaled, plain, args, alpha, betas, rtol=1e-5, atol=1e-6):
    """scaled(*args) == alpha * plain(*args); grad_i == beta_i * vjp_plain_i."""
    y = scaled(*args)
    y_plain, vjp_plain = jax.vjp(plain, *args)
    chex.assert_trees_all_close(y, alpha * y_plain, rtol=rtol, atol=atol)
    g = _rand(99, jnp.shape(y), jnp.result_type(y))
    _, vjp_scaled = jax.vjp(scaled, *args)
    grads, grads_plain = vjp_scaled(g), vjp_plain(g)
    for i, beta in enumerate(betas):
        if beta is not None:
            chex.assert_trees_all_close(grads[i], beta * grads_plain[i], rtol=rtol, atol=atol)


def test_scale_primitives():
    x = _rand(0, (4, 8))
    y, vjp = jax.vjp(lambda x: ops.scale_fwd(x, 3.0), x)
    chex.assert_trees_all_close(y, 3.0 * x)
    chex.assert_trees_all_close(vjp(jnp.ones_like(x))[0], jnp.ones_like(x))
    y, vjp = jax.vjp(lambda x: ops.scale_bwd(x, 3.0), x)
    chex.assert_trees_all_close(y, x)
    chex.assert_trees_all_close(vjp(jnp.ones_like(x))[0], 3.0 * jnp.ones_like(x))
    # value_and_grad must see the scaled primal (the known custom_vjp pitfall).
    v, g = jax.value_and_grad(lambda x: jnp.sum(ops.scale_fwd(x, 0.5)))(x)
    chex.assert_trees_all_close(v, 0.5 * jnp.sum(x), rtol=1e-6)
    chex.assert_trees_all_close(g, jnp.ones_like(x))
    with pytest.raises(TypeError, match="static Python float"):
        jax.jit(lambda x, s: ops.scale_fwd(x, s))(x, 2.0)


@pytest.mark.parametrize("constraint", [None, "to_output_scale", "to_grad_input_scale", "gmean",
                                        "hmean", "amean"])
def test_linear_scales(constraint):
    x, w, b = _rand(0, (3, 5, 16)), _rand(1, (16, 64)), _rand(2, (64,))
    fan_in, fan_out, batch = 16, 64, 15
    a, bx = fan_in ** -0.5, fan_out ** -0.5
    a, bx = {
        None: (a, bx), "to_output_scale": (a, a), "to_grad_input_scale": (bx, bx),
        "gmean": ((a * bx) ** 0.5,) * 2, "hmean": (2 / (1 / a + 1 / bx),) * 2,
        "amean": ((a + bx) / 2,) * 2,
    }[constraint]
    bw = batch ** -0.5
    check_op(lambda x, w, b: ops.linear(x, w, b, constraint=constraint),
             lambda x, w, b: x @ w + b, (x, w, b), a, (bx, bw, bw))


def test_linear_readout_scales():
    x, w = _rand(0, (6, 32)), _rand(1, (32, 10))
    check_op(lambda x, w: ops.linear_readout(x, w), lambda x, w: x @ w, (x, w),
             1 / 32, (10 ** -0.5, 6 ** -0.5))
    check_op(lambda x, w: ops.linear_readout(x, w, constraint="to_output_scale"),
             lambda x, w: x @ w, (x, w), 1 / 32, (1 / 32, 6 ** -0.5))


@pytest.mark.parametrize("constraint", [None, "to_output_scale", "to_left_grad_scale",
                                        "to_right_grad_scale", "gmean"])
def test_matmul_scales(constraint):
    a, b = _rand(0, (2, 8, 16)), _rand(1, (2, 16, 32))
    s = {"out": 16 ** -0.5, "left": 32 ** -0.5, "right": 8 ** -0.5}
    if constraint is None:
        al, ba, bb = s["out"], s["left"], s["right"]
    elif constraint == "gmean":
        al = ba = bb = (s["out"] * s["left"] * s["right"]) ** (1 / 3)
    else:
        al = ba = bb = s[{"to_output_scale": "out", "to_left_grad_scale": "left",
                          "to_right_grad_scale": "right"}[constraint]]
    check_op(lambda a, b: ops.matmul(a, b, constraint=constraint), jnp.matmul, (a, b), al, (ba, bb))


def test_add_scales():
    a, b = _rand(0, (4, 8)), _rand(1, (8,))
    check_op(lambda a, b: ops.add(a, b, constraint=None), jnp.add, (a, b), 2 ** -0.5,
             (1.0, 4 ** -0.5))
    check_op(lambda a, b: ops.add(a, b), jnp.add, (a, b), 2 ** -0.5, (2 ** -0.5, 2 ** -0.5))
    assert ops.add(2.0, 3.0) == 5.0  # Python scalars: plain add
    chex.assert_trees_all_close(ops.add(a, 1.0), a + 1.0)
    check_op(lambda a, b: ops.add(a, b, constraint=None), jnp.add, (a, jnp.ones((1,))), 1.0,
             (1.0, 32 ** -0.5))


@pytest.mark.parametrize("mult", [1.0, 0.5, 4.0])
@pytest.mark.parametrize("approximate", [False, True])
def test_gelu_scales(mult, approximate):
    x = _rand(0, (4, 64))
    a = 1 / (1 + 0.25 / mult**2)
    alpha = interp(a, 2, (2 / (1 - 1 / math.pi)) ** 0.5)
    beta = interp(a, 2, 2**0.5)
    plain = lambda x: jax.nn.gelu(x * mult, approximate=approximate) / mult  # noqa: E731
    check_op(lambda x: ops.gelu(x, mult=mult, constraint=None, approximate=approximate), plain,
             (x,), alpha, (beta,))
    # tied scales: alpha * gelu with its ordinary gradient, whose products are rounded in
    # another order; the tanh form's derivative cancels to ~1e-5 at mult 4 (float32 noise there)
    check_op(lambda x: ops.gelu(x, mult=mult, approximate=approximate), plain, (x,), alpha,
             (alpha,), atol=4e-6 if approximate else 1e-6)


@pytest.mark.parametrize("mult", [1.0, 2.0])
def test_silu_scales(mult):
    x = _rand(0, (4, 64))
    alpha = interp(1 / (1 + 0.25 / mult**2), 2, (2 / (1 - 1 / math.pi)) ** 0.5)
    beta = interp(1 / (1 + 1 / mult**2), 2, 2**0.5)
    plain = lambda x: x * jax.nn.sigmoid(mult * x)  # noqa: E731
    check_op(lambda x: ops.silu(x, mult=mult, constraint=None), plain, (x,), alpha, (beta,))
    check_op(lambda x: ops.silu(x, mult=mult, constraint="to_grad_input_scale"), plain, (x,), beta,
             (beta,))


@pytest.mark.parametrize("mult", [1.0, 0.7])
def test_silu_glu_scales(mult):
    x, g = _rand(0, (4, 64)), _rand(1, (4, 64))
    s = interp(1 / (1 + 1 / mult**2), 2, 2**0.5)
    check_op(lambda x, g: ops.silu_glu(x, g, mult=mult),
             lambda x, g: x * g * jax.nn.sigmoid(mult * g), (x, g), s, (s, s))


@pytest.mark.parametrize("mult", [1.0, 3.0])
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_scales(mult, axis):
    x = _rand(0, (12, 20))
    n = x.shape[axis]
    a = 1 / (1 + 4 / mult**2)
    alpha, beta = interp(a, n, n**0.5), interp(a, n / mult, (n / mult) ** 0.5)
    plain = lambda x: jax.nn.softmax(mult * x, axis=axis)  # noqa: E731
    check_op(lambda x: ops.softmax(x, axis, mult=mult, constraint=None), plain, (x,), alpha,
             (beta,))
    check_op(lambda x: ops.softmax(x, axis, mult=mult), plain, (x,), alpha, (alpha,))


def test_dropout_scales():
    x = _rand(0, (64, 64))
    s = 0.8 ** 0.5
    check_op(lambda x: ops.dropout(x, 0.2, deterministic=True), lambda x: x, (x,), s, (s,))
    key = jax.random.key(3)
    y = ops.dropout(x, 0.2, rng=key)
    kept = y != 0
    assert 0.75 < float(jnp.mean(kept)) < 0.85
    chex.assert_trees_all_close(jnp.where(kept, y, 0), jnp.where(kept, x * s / 0.8, 0), rtol=1e-6)
    g = jax.grad(lambda x: jnp.sum(ops.dropout(x, 0.2, rng=key)))(x)
    chex.assert_trees_all_close(g, jnp.where(kept, s / 0.8, 0.0), rtol=1e-6)


def test_norm_scales():
    x, w, b = _rand(0, (3, 5, 16)), 1 + 0.1 * _rand(1, (16,)), _rand(2, (16,))
    s = (16 / x.size) ** 0.5

    def ln(x, w, b):
        m = x.mean(-1, keepdims=True)
        v = ((x - m) ** 2).mean(-1, keepdims=True)
        return (x - m) / jnp.sqrt(v + 1e-5) * w + b

    check_op(lambda x, w, b: ops.layer_norm(x, w, b), ln, (x, w, b), 1.0, (1.0, s, s), rtol=1e-4,
             atol=1e-5)
    rms = lambda x, w: x / jnp.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w  # noqa: E731
    check_op(lambda x, w: ops.rms_norm(x, w), rms, (x, w), 1.0, (1.0, s), rtol=1e-4, atol=1e-5)


def test_embedding_scales():
    ids = jax.random.randint(jax.random.key(0), (4, 6), 0, 10)
    t = _rand(1, (10, 8))
    check_op(lambda t: ops.embedding(ids, t), lambda t: t[ids], (t,), 1.0, ((10 / 24) ** 0.5,))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("mult", [1.0, 2.0])
def test_attention_scales(is_causal, mult):
    q, k, v = _rand(0, (2, 6, 3, 8)), _rand(1, (2, 6, 3, 8)), _rand(2, (2, 6, 3, 8))
    a = 1 / (1 + 4 * 8 / mult**2)
    lo = ((math.log(6) if is_causal else 1.0) / 6) ** 0.5
    s = 1 / interp(a, lo, 1.0)

    def plain(q, k, v):
        logits = jnp.einsum("btnh,bsnh->bnts", q, k) * mult / 8
        if is_causal:
            logits = jnp.where(jnp.tril(jnp.ones((6, 6), bool)), logits, -jnp.inf)
        return jnp.einsum("bnts,bsnh->btnh", jax.nn.softmax(logits, -1), v)

    check_op(lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=is_causal,
                                                               mult=mult),
             plain, (q, k, v), s, (s, s, s), rtol=1e-4, atol=1e-5)


def test_attention_mask_and_dropout():
    q, k, v = _rand(0, (2, 5, 2, 4)), _rand(1, (2, 5, 2, 4)), _rand(2, (2, 5, 2, 4))
    pad = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]
    out = ops.scaled_dot_product_attention(q, k, v, mask=pad, is_causal=True)
    v2 = v.at[0, 3:].set(100.0)  # padded keys must not matter
    out2 = ops.scaled_dot_product_attention(q, k, v2, mask=pad, is_causal=True)
    chex.assert_trees_all_close(out[0, :3], out2[0, :3], rtol=1e-5)
    # The dropout path (explicit softmax) agrees with the fused path when nothing is dropped in
    # expectation: with a tiny rate the outputs are close.
    ref = ops.scaled_dot_product_attention(q, k, v, is_causal=True)
    dropped = ops.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_rate=1e-6,
                                               rng=jax.random.key(0))
    chex.assert_trees_all_close(dropped, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mult", [1.0, 2.0])
def test_cross_entropy_scales(mult):
    logits = _rand(0, (4, 5, 11))
    labels = jax.random.randint(jax.random.key(1), (4, 5), 0, 11)
    loss, g = jax.value_and_grad(lambda x: ops.cross_entropy(x, labels, mult=mult))(logits)
    logp = jax.nn.log_softmax(mult * logits)
    expected = -jnp.mean(jnp.take_along_axis(logp, labels[..., None], -1))
    chex.assert_trees_all_close(loss, expected, rtol=1e-6)
    onehot = jax.nn.one_hot(labels, 11)
    chex.assert_trees_all_close(g, (jax.nn.softmax(mult * logits) - onehot) * 11 / 10 ** 0.5,
                                rtol=1e-5, atol=1e-6)
    where = jnp.arange(20).reshape(4, 5) % 3 != 0
    loss_w, g_w = jax.value_and_grad(
        lambda x: ops.cross_entropy(x, labels, mult=mult, where=where))(logits)
    nll = -jnp.take_along_axis(logp, labels[..., None], -1)[..., 0]
    chex.assert_trees_all_close(loss_w, jnp.sum(jnp.where(where, nll, 0)) / jnp.sum(where),
                                rtol=1e-6)
    chex.assert_trees_all_close(g_w, jnp.where(where[..., None], g, 0.0), rtol=1e-5, atol=1e-6)


def test_mse_scales():
    p, t = _rand(0, (8, 16)), _rand(1, (8, 16))
    loss, (gp, gt) = jax.value_and_grad(ops.mse_loss, argnums=(0, 1))(p, t)
    chex.assert_trees_all_close(loss, jnp.mean((p - t) ** 2), rtol=1e-6)
    chex.assert_trees_all_close(gp, 2 * (p - t) * 8 ** -0.5, rtol=1e-5)
    chex.assert_trees_all_close(gt, -2 * (p - t) * 8 ** -0.5, rtol=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.3])
def test_residual_scales(tau):
    x = _rand(0, (4, 8))
    d = (1 + tau**2) ** 0.5
    fn = jnp.tanh
    y, vjp = jax.vjp(lambda x: ops.residual_apply(fn, x, tau), x)
    chex.assert_trees_all_close(y, tau / d * fn(x) + x / d, rtol=1e-6)
    g = _rand(1, (4, 8))
    (gx,) = vjp(g)
    _, vjp_fn = jax.vjp(fn, x)
    chex.assert_trees_all_close(gx, tau / d * vjp_fn(g)[0] + g / d, rtol=1e-5)


def test_constraints_validated():
    x, w = _rand(0, (2, 4)), _rand(1, (4, 4))
    with pytest.raises(ValueError, match="valid constraints are: .*'gmean'"):
        ops.linear(x, w, constraint="geometric")
    with pytest.raises(ValueError, match="two inputs"):
        ops.linear(x, w, constraint="to_left_grad_scale")
    with pytest.raises(ValueError, match="one input"):
        ops.matmul(x, w, constraint="to_grad_input_scale")


def test_logarithmic_interpolation():
    assert ops.logarithmic_interpolation(0.0, 1e-3, 1e-1) == pytest.approx(1e-3)
    assert ops.logarithmic_interpolation(0.5, 1e-3, 1e-1) == pytest.approx(1e-2)
    assert ops.logarithmic_interpolation(1.0, 1e-3, 1e-1) == pytest.approx(1e-1)


class TestResidualRule:
    @pytest.mark.parametrize("n_layers", [1, 4, 12])
    def test_defaults(self, n_layers):
        L = 2 * n_layers
        tau = ops.transformer_residual_scaling_rule()
        for i in range(L):
            assert tau(i, L) == pytest.approx(1 / (L / 2 + i) ** 0.5)

    @staticmethod
    def contributions(mult, ratio, n_layers, alpha=0.5):
        """Variance each branch (and the embedding) contributes to the final residual stream."""
        L = 2 * n_layers
        tau = ops.transformer_residual_scaling_rule(mult, ratio, depth_exponent=alpha)
        contrib = [1.0]  # embedding, unit variance
        for i in range(L):
            t = tau(i, L)
            contrib = [c / (1 + t**2) for c in contrib] + [t**2 / (1 + t**2)]
        return contrib

    @pytest.mark.parametrize("mult,ratio", [(1.0, 1.0), (2.0, 0.5), (0.5, 3.0)])
    def test_properties(self, mult, ratio):
        n_layers = 6
        c = self.contributions(mult, ratio, n_layers)
        assert sum(c) == pytest.approx(1.0)  # total variance stays 1
        emb, attn, mlp = c[0], c[1::2], c[2::2]
        np.testing.assert_allclose(attn, attn[0], rtol=1e-9)  # equal per-layer contributions
        np.testing.assert_allclose(mlp, mlp[0], rtol=1e-9)
        assert attn[0] / mlp[0] == pytest.approx(ratio**2)  # attention / MLP ratio rho (in std)
        # all attention and all MLP branches together, on average, weigh residual_mult^2 against
        # the embedding
        assert (sum(attn) + sum(mlp)) / 2 / emb == pytest.approx(mult**2)

    @pytest.mark.parametrize("alpha", [0.5, 0.75, 1.0])
    @pytest.mark.parametrize("n_layers", [2, 8])
    def test_depth_exponent_is_the_unnormalised_stream(self, alpha, n_layers):
        """tau_i = m_i / sqrt(Var h_i) for h_{i+1} = h_i + m_i f_i, m_i = alpha_i (L/2)^-a."""
        L, mult, ratio = 2 * n_layers, 1.5, 0.5
        tau = ops.transformer_residual_scaling_rule(mult, ratio, depth_exponent=alpha)
        a_mlp = mult * (2 / (1 + ratio**2)) ** 0.5
        var = 1.0  # the embedding's
        for i in range(L):
            m = (ratio * a_mlp if i % 2 == 0 else a_mlp) * (L / 2) ** -alpha
            assert tau(i, L) == pytest.approx(m / var**0.5, rel=1e-12)
            var += m**2
        # alpha 1 (CompleteP): all branches together weigh ~ mult^2 / n_layers against the
        # embedding, alpha 1/2 (u-muP): mult^2, whatever the depth
        c = self.contributions(mult, ratio, n_layers, alpha)
        share = (sum(c[1:]) / 2) / c[0]
        assert share == pytest.approx(mult**2 * n_layers ** (1 - 2 * alpha), rel=1e-9)

    def test_depth_exponent_default_is_bitwise_the_old_rule(self):
        for L in (2, 8, 24):
            for i in range(L):
                assert (ops.transformer_residual_scaling_rule(depth_exponent=0.5)(i, L)
                        == ops.transformer_residual_scaling_rule()(i, L)
                        == 1 / (L / 2 + i) ** 0.5)

    @pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
    def test_depth_exponent_out_of_range(self, alpha):
        with pytest.raises(ValueError, match=r"depth_exponent must be > 0"):
            ops.transformer_residual_scaling_rule(depth_exponent=alpha)
