"""Linear attention (``ops.plain.linear_attention``, ``ops.linear_attention``): values and
gradients against a dense O(S^2) reference, causal prefix sums with no [S, S] tensor, cached
decoding, the unit-scaling rule at init, and bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unitscale_jax import ops
from unitscale_jax.ops import plain
from unitscale_jax.ops.linear_attention import (
    PHI_GRAD_SECOND_MOMENT,
    PHI_MEAN,
    PHI_SECOND_MOMENT,
)


def _phi(x):
    return jnp.where(x > 0, x + 1.0, jnp.exp(x))


def dense_reference(q, k, v, *, is_causal=False, key_mask=None):
    """The O(S^2) definition: weights phi(q_t) . phi(k_s) over the keys each query sees."""
    h, n_kv = q.shape[2], k.shape[2]
    k, v = jnp.repeat(k, h // n_kv, axis=2), jnp.repeat(v, h // n_kv, axis=2)
    w = jnp.einsum("bthd,bshd->bhts", _phi(q), _phi(k))
    keep = jnp.ones(w.shape[-2:], bool)
    if is_causal:
        keep = jnp.tril(keep)
    if key_mask is not None:
        keep = jnp.logical_and(keep, key_mask[:, None, None, :])
    w = jnp.where(keep, w, 0.0)
    return jnp.einsum("bhts,bshd->bthd", w, v) / jnp.sum(w, axis=-1)[..., None].swapaxes(1, 2)


def _inputs(shape_q, shape_kv, seed=0):
    kq, kk, kv, kg = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(kq, shape_q), jax.random.normal(kk, shape_kv),
            jax.random.normal(kv, shape_kv), jax.random.normal(kg, shape_q))


def _values_and_grads(f, q, k, v, g):
    """``(f(q, k, v), dq, dk, dv)`` for the incoming gradient ``g`` (jitted: fast on CPU)."""
    def run(q, k, v, g):
        y, vjp = jax.vjp(f, q, k, v)
        return (y, *vjp(g))
    return jax.jit(run)(q, k, v, g)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("heads,kv_heads,seq,chunk,masked", [
    (2, 2, 37, 8, False),     # odd length, not a multiple of the chunk
    (4, 2, 37, 8, True),      # GQA and a padding mask
    (3, 1, 5, 64, True),      # multi-query; a chunk longer than the sequence
])
def test_matches_the_dense_reference_values_and_gradients(is_causal, heads, kv_heads, seq,
                                                          chunk, masked):
    b, d = 2, 8
    q, k, v, g = _inputs((b, seq, heads, d), (b, seq, kv_heads, d))
    key_mask = None
    if masked:  # right padding in the first row, a hole in the second; key 0 always kept
        pos = jnp.arange(seq)
        key_mask = jnp.stack([pos < seq - seq // 3, pos % 3 != 1])
    got = _values_and_grads(lambda q, k, v: plain.linear_attention(
        q, k, v, is_causal=is_causal, mask=key_mask, chunk_size=chunk), q, k, v, g)
    want = _values_and_grads(lambda q, k, v: dense_reference(
        q, k, v, is_causal=is_causal, key_mask=key_mask), q, k, v, g)
    for name, a, w in zip(("out", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, w, rtol=2e-5, atol=2e-5, err_msg=name)
    if masked:  # masked keys get no gradient at all
        hidden = ~key_mask
        assert float(jnp.abs(got[2][hidden]).max()) == 0.0
        assert float(jnp.abs(got[3][hidden]).max()) == 0.0


def test_a_mask_of_shape_b11s_equals_the_padding_mask_and_an_empty_row_gives_zeros():
    q, k, v, g = _inputs((2, 6, 2, 4), (2, 6, 2, 4))
    key_mask = jnp.array([[True] * 6, [False] * 6])
    a = jax.jit(lambda q, k, v: plain.linear_attention(q, k, v, mask=key_mask))(q, k, v)
    b = jax.jit(lambda q, k, v: plain.linear_attention(q, k, v, mask=key_mask[:, None, None]))(
        q, k, v)
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a[1]).max()) == 0.0 and bool(jnp.isfinite(a).all())
    for grads in _values_and_grads(lambda q, k, v: plain.linear_attention(
            q, k, v, is_causal=True, mask=key_mask), q, k, v, g)[1:]:
        assert bool(jnp.isfinite(grads).all()) and float(jnp.abs(grads[1]).max()) == 0.0


def test_decoding_with_a_state_equals_one_causal_pass():
    q, k, v, _ = _inputs((2, 23, 4, 8), (2, 23, 2, 8), seed=3)
    @jax.jit
    def pieces(q, k, v):
        full = plain.linear_attention(q, k, v, is_causal=True, chunk_size=4)
        state = plain.linear_attention_state(2, 2, 8)
        outs, start = [], 0
        for n in (7, 1, 15):  # a prompt, a single token, then a longer piece
            sl = slice(start, start + n)
            out, state = plain.linear_attention(q[:, sl], k[:, sl], v[:, sl], is_causal=True,
                                                state=state, chunk_size=4)
            outs.append(out)
            start += n
        scaled_full = ops.linear_attention(q, k, v, is_causal=True)
        first, st = ops.linear_attention(q[:, :10], k[:, :10], v[:, :10], is_causal=True,
                                         state=plain.linear_attention_state(2, 2, 8),
                                         scale_seq_len=23)
        rest, _ = ops.linear_attention(q[:, 10:], k[:, 10:], v[:, 10:], is_causal=True,
                                       state=st, scale_seq_len=23)
        return (full, jnp.concatenate(outs, axis=1), scaled_full,
                jnp.concatenate([first, rest], axis=1))

    full, cached, scaled_full, scaled_cached = pieces(q, k, v)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scaled_cached, scaled_full, rtol=1e-5, atol=1e-6)
    assert not np.allclose(scaled_full, full)   # the scale is there


def test_causal_prefix_sums_hold_no_seq_by_seq_tensor_at_16k():
    seq, h, d = 16384, 2, 16
    shape = jax.ShapeDtypeStruct((1, seq, h, d), jnp.float32)

    def fwd_bwd(q, k, v):
        y, vjp = jax.vjp(lambda q, k, v: ops.linear_attention(q, k, v, is_causal=True), q, k, v)
        return y, vjp(y)

    lowered = jax.jit(fwd_bwd).lower(shape, shape, shape)
    assert f"{seq},{seq}" not in lowered.as_text() and f"{seq}, {seq}" not in lowered.as_text()
    compiled = lowered.compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    score_bytes = h * seq * seq * 4   # one float32 [heads, S, S] score tensor: 2 GiB
    inputs = 3 * seq * h * d * 4
    assert temp < 64 * inputs, (temp, inputs)          # O(S d): tens of MiB
    assert temp < score_bytes / 50, (temp, score_bytes)
    assert f"{seq},{seq}" not in compiled.as_text()


def _init_stds(seq, d, is_causal, heads=4):
    # bidirectional outputs (and dv) of one head are nearly the same mean at every position:
    # batch * heads * d independent numbers; >= 1024 of them keep the std's noise ~2%
    batch = max(1024 // (heads * d), 2**17 // (seq * heads * d), 1)
    q, k, v, g = _inputs((batch, seq, heads, d), (batch, seq, heads, d), seed=seq + d)
    y, dq, dk, dv = _values_and_grads(
        lambda q, k, v: ops.linear_attention(q, k, v, is_causal=is_causal), q, k, v, g)
    return {n: float(jnp.std(t)) for n, t in zip(("out", "dq", "dk", "dv"), (y, dq, dk, dv))}


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("seq,d", [(16, 16), (16, 128), (4096, 16), (512, 128)])
def test_unit_scale_at_init(seq, d, is_causal):
    stds = _init_stds(seq, d, is_causal)
    for name, std in stds.items():
        assert abs(std - 1.0) < 0.1, (name, stds)


def test_the_plain_op_is_far_from_unit_scale_which_the_rule_corrects():
    """The rule is not the identity: unscaled, the output is ~ S^-1/2 and dq, dk far smaller."""
    q, k, v, g = _inputs((4, 256, 4, 64), (4, 256, 4, 64))
    y, dq, dk, dv = _values_and_grads(lambda q, k, v: plain.linear_attention(q, k, v), q, k, v, g)
    sc = ops.linear_attention_scales(256, 64)
    assert float(jnp.std(y)) < 0.1 and float(jnp.std(dq)) < 0.01
    assert sc.beta_q > 10 * sc.alpha and sc.beta_k > 5 * sc.alpha and sc.beta_v == sc.alpha
    for t, s in ((y, sc.alpha), (dq, sc.beta_q), (dk, sc.beta_k), (dv, sc.beta_v)):
        assert abs(float(jnp.std(t)) * s - 1.0) < 0.1


def test_the_moments_of_phi_are_the_numbers_the_rule_uses():
    x = np.random.default_rng(0).standard_normal(4_000_000)
    phi = np.where(x > 0, x + 1, np.exp(x))
    grad = np.where(x > 0, 1.0, np.exp(x))
    assert math.isclose(phi.mean(), PHI_MEAN, rel_tol=2e-3)
    assert math.isclose((phi**2).mean(), PHI_SECOND_MOMENT, rel_tol=3e-3)
    assert math.isclose((grad**2).mean(), PHI_GRAD_SECOND_MOMENT, rel_tol=3e-3)
    assert (round(PHI_MEAN, 5), round(PHI_SECOND_MOMENT, 5)) == (1.16052, 1.96599)


def test_the_causal_rule_follows_the_flat_softmax_bound_and_one_key_has_no_qk_gradient():
    for s in (64, 4096):  # alpha^-2 ~ (ln S + gamma) / S, as softmax's flat lower bound
        alpha = ops.linear_attention_scales(s, 10**6, is_causal=True).alpha
        assert math.isclose(alpha**-2, (math.log(s) + 0.5772) / s, rel_tol=0.02)
    one = ops.linear_attention_scales(1, 32, is_causal=True)
    assert one == (1.0, 1.0, 1.0, 1.0)
    q, k, v, g = _inputs((1, 1, 1, 4), (1, 1, 1, 4))
    _, dq, dk, dv = _values_and_grads(lambda q, k, v: ops.linear_attention(q, k, v), q, k, v, g)
    assert float(jnp.abs(dq).max()) < 1e-6 and float(jnp.abs(dk).max()) < 1e-6  # rounding
    np.testing.assert_allclose(dv, g, rtol=1e-6)


@pytest.mark.parametrize("call,match", [
    (lambda q, k, v: plain.linear_attention(q, k, v, mask=jnp.ones((2, 1, 6, 6), bool)),
     r"key padding mask only \(\[batch, kv_len\]"),
    (lambda q, k, v: plain.linear_attention(q, k, v, mask=jnp.ones((2, 5), bool)),
     r"does not broadcast to the key padding mask \[2, 6\]"),
    (lambda q, k, v: plain.linear_attention(q[:, :3], k, v, is_causal=True),
     "causal linear attention needs q_len == kv_len"),
    (lambda q, k, v: plain.linear_attention(q, k, v, is_causal=True, chunk_size=0),
     "chunk_size must be a positive int, got 0"),
    (lambda q, k, v: plain.linear_attention(q, k, v, state=plain.linear_attention_state(2, 2, 4)),
     "pass is_causal=True"),
    (lambda q, k, v: plain.linear_attention(q, k, v, is_causal=True,
                                            state=plain.linear_attention_state(2, 2, 8)),
     r"state must be .*\(batch, kv_heads, head_dim\)"),
    (lambda q, k, v: ops.linear_attention(q, k, v, is_causal=True,
                                          state=plain.linear_attention_state(2, 2, 4)),
     "needs scale_seq_len"),
    (lambda q, k, v: plain.linear_attention(q, k[:, :, :1].repeat(3, axis=2),
                                            v[:, :, :1].repeat(3, axis=2)),
     r"q heads \(2\) must be a multiple of kv heads \(3\)"),
])
def test_bad_input_is_a_clear_error(call, match):
    q, k, v, _ = _inputs((2, 6, 2, 4), (2, 6, 2, 4))
    with pytest.raises(ValueError, match=match):
        call(q, k, v)
