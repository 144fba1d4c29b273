"""Every op under jit, grad and vmap, in bf16/fp16, and clear errors for bad input."""

import chex
import jax
import jax.numpy as jnp
import pytest

from unitscale_jax import ops

K = jax.random.split(jax.random.key(0), 8)
IDS = jax.random.randint(K[7], (2, 6), 0, 10)
LABELS = jax.random.randint(K[6], (2, 6), 0, 16)
TEACHER = 3.0 * jax.random.normal(K[5], (2, 6, 16))

# name -> (fn of float args, float args)
CASES = {
    "linear": (lambda x, w, b: ops.linear(x, w, b),
               lambda d: (jax.random.normal(K[0], (2, 6, 16), d),
                          jax.random.normal(K[1], (16, 8), d), jnp.zeros(8, d))),
    "linear_readout": (lambda x, w: ops.linear_readout(x, w),
                       lambda d: (jax.random.normal(K[0], (2, 6, 16), d),
                                  jax.random.normal(K[1], (16, 8), d))),
    "matmul": (ops.matmul, lambda d: (jax.random.normal(K[0], (2, 6, 16), d),
                                      jax.random.normal(K[1], (2, 16, 8), d))),
    "add": (ops.add, lambda d: (jax.random.normal(K[0], (2, 6, 16), d),
                                jax.random.normal(K[1], (16,), d))),
    "gelu": (lambda x: ops.gelu(x, mult=0.5), lambda d: (jax.random.normal(K[0], (2, 6, 16), d),)),
    "silu": (lambda x: ops.silu(x, mult=2.0), lambda d: (jax.random.normal(K[0], (2, 6, 16), d),)),
    "silu_glu": (ops.silu_glu, lambda d: (jax.random.normal(K[0], (2, 6, 16), d),
                                          jax.random.normal(K[1], (2, 6, 16), d))),
    "softmax": (lambda x: ops.softmax(x, -1, mult=2.0),
                lambda d: (jax.random.normal(K[0], (2, 6, 16), d),)),
    "dropout": (lambda x: ops.dropout(x, 0.3, deterministic=True),
                lambda d: (jax.random.normal(K[0], (2, 6, 16), d),)),
    "layer_norm": (ops.layer_norm, lambda d: (jax.random.normal(K[0], (2, 6, 16), d),
                                              jnp.ones(16, d), jnp.zeros(16, d))),
    "rms_norm": (ops.rms_norm, lambda d: (jax.random.normal(K[0], (2, 6, 16), d), jnp.ones(16, d))),
    "embedding": (lambda t: ops.embedding(IDS, t),
                  lambda d: (jax.random.normal(K[0], (10, 16), d),)),
    "attention": (lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True),
                  lambda d: tuple(jax.random.normal(k, (2, 6, 2, 8), d) for k in K[:3])),
    "cross_entropy": (lambda x: ops.cross_entropy(x, LABELS),
                      lambda d: (jax.random.normal(K[0], (2, 6, 16), d),)),
    "kl_divergence": (lambda x: ops.kl_divergence(x, TEACHER.astype(x.dtype), temperature=2.0),
                      lambda d: (jax.random.normal(K[0], (2, 6, 16), d),)),
    "mse_loss": (ops.mse_loss, lambda d: (jax.random.normal(K[0], (2, 6, 16), d),
                                          jax.random.normal(K[1], (2, 6, 16), d))),
    "residual": (lambda x, w: ops.residual_apply(lambda r: ops.linear(r, w), x, 0.5),
                 lambda d: (jax.random.normal(K[0], (2, 6, 16), d),
                            jax.random.normal(K[1], (16, 16), d))),
}


def loss_of(fn):
    return lambda *a: jnp.sum(fn(*a).astype(jnp.float32))


@pytest.mark.parametrize("name", sorted(CASES))
def test_jit_and_grad_match_eager(name):
    fn, make = CASES[name]
    args = make(jnp.float32)
    chex.assert_trees_all_close(jax.jit(fn)(*args), fn(*args), rtol=1e-5, atol=1e-6)
    argnums = tuple(range(len(args)))
    g_eager = jax.grad(loss_of(fn), argnums)(*args)
    g_jit = jax.jit(jax.grad(loss_of(fn), argnums))(*args)
    chex.assert_trees_all_close(g_jit, g_eager, rtol=1e-5, atol=1e-6)
    chex.assert_tree_all_finite(g_jit)


VMAP_AXES = {
    "linear": (0, None, None), "linear_readout": (0, None), "matmul": (0, 0), "add": (0, None),
    "gelu": (0,), "silu": (0,), "silu_glu": (0, 0), "softmax": (0,), "dropout": (0,),
    "layer_norm": (0, None, None), "rms_norm": (0, None), "attention": (0, 0, 0),
    "mse_loss": (0, 0), "residual": (0, None),
}

VMAP_CASES = {
    **{name: (CASES[name][0], CASES[name][1], axes) for name, axes in VMAP_AXES.items()},
    "embedding": (lambda ids, t: ops.embedding(ids, t),
                  lambda d: (IDS, CASES["embedding"][1](d)[0]), (0, None)),
    "cross_entropy": (ops.cross_entropy,
                      lambda d: (CASES["cross_entropy"][1](d)[0], LABELS), (0, 0)),
    "kl_divergence": (lambda x, t: ops.kl_divergence(x, t, temperature=2.0),
                      lambda d: (CASES["kl_divergence"][1](d)[0], TEACHER.astype(d)), (0, 0)),
}


@pytest.mark.parametrize("name", sorted(VMAP_CASES))
def test_vmap_matches_loop(name):
    fn, make, in_axes = VMAP_CASES[name]
    args = make(jnp.float32)
    out = jax.vmap(fn, in_axes)(*args)
    pick = lambda i: [a[i] if ax == 0 else a for a, ax in zip(args, in_axes)]  # noqa: E731
    loop = jnp.stack([fn(*pick(i)) for i in range(2)])
    # Forward scales depend on feature sizes only, so vmapped and per-example values agree.
    chex.assert_trees_all_close(out, loop, rtol=1e-5, atol=1e-6)
    float_arg = 1 if name == "embedding" else 0
    g = jax.vmap(jax.grad(loss_of(fn), float_arg), in_axes)(*args)
    expected_shape = (args[float_arg].shape if in_axes[float_arg] == 0
                      else (2, *args[float_arg].shape))
    chex.assert_shape(g, expected_shape)
    chex.assert_tree_all_finite(g)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_low_precision_dtypes_kept(name, dtype):
    fn, make = CASES[name]
    args = tuple(a.astype(dtype) for a in make(jnp.float32))
    out = jax.jit(fn)(*args)
    expected_dtype = jnp.float32 if name in ("cross_entropy", "kl_divergence") else dtype
    assert out.dtype == expected_dtype, out.dtype
    grads = jax.jit(jax.grad(loss_of(fn), tuple(range(len(args)))))(*args)
    for g in grads:
        assert g.dtype == dtype
    chex.assert_tree_all_finite(grads)
    ref = fn(*make(jnp.float32))
    chex.assert_trees_all_close(out.astype(jnp.float32), ref, rtol=0.05, atol=0.1)


def test_check_ids_eager_and_jit():
    table = jnp.ones((10, 4))
    bad = jnp.array([[1, 2, 10]])
    with pytest.raises(ValueError, match=r"found values in \[1, 10\] but valid ids are \[0, 9\]"):
        ops.embedding(bad, table, check_ids=True)
    with pytest.raises(Exception, match="out of range"):
        jax.block_until_ready(jax.jit(lambda i: ops.embedding(i, table, check_ids=True))(bad))
    ok = jax.jit(lambda i: ops.embedding(i, table, check_ids=True))(jnp.array([[0, 9]]))
    assert ok.shape == (1, 2, 4)
    with pytest.raises(Exception, match="labels out of range"):
        jax.block_until_ready(jax.jit(lambda x, y: ops.cross_entropy(x, y, check_ids=True))(
            jnp.zeros((3, 5)), jnp.array([0, 5, 1])))
    # masked positions are not checked
    where = jnp.array([True, False, True])
    ops.cross_entropy(jnp.zeros((3, 5)), jnp.array([0, 7, 1]), where=where, check_ids=True)


@pytest.mark.parametrize("call,err,match", [
    (lambda: ops.linear(jnp.ones((2, 8)), jnp.ones((4, 3))),
     ValueError, "fan-in 4 .* does not match"),
    (lambda: ops.linear(jnp.ones((2, 8)), jnp.ones((8,))), ValueError, "kernel must have rank 2"),
    (lambda: ops.linear(jnp.ones((2, 8)), jnp.ones((8, 3)), jnp.ones((4,))),
     ValueError, r"bias must have shape \(3,\)"),
    (lambda: ops.linear(jnp.ones((2, 8), jnp.int32), jnp.ones((8, 3))),
     TypeError, "floating-point"),
    (lambda: ops.matmul(jnp.ones((2, 8)), jnp.ones((4, 3))),
     ValueError, "contracting dimensions differ"),
    (lambda: ops.matmul(jnp.ones((8,)), jnp.ones((8, 3))), ValueError, "rank >= 2"),
    (lambda: ops.add(jnp.ones((2, 3)), jnp.ones((4,))), ValueError, "do not broadcast"),
    (lambda: ops.embedding(jnp.ones((2, 3)), jnp.ones((4, 5))), TypeError, "integer token ids"),
    (lambda: ops.dropout(jnp.ones(3), 1.0, rng=jax.random.key(0)), ValueError, r"\[0, 1\)"),
    (lambda: ops.dropout(jnp.ones(3), -0.1), ValueError, r"\[0, 1\)"),
    (lambda: ops.dropout(jnp.ones(3), 0.5), ValueError, "rng is required"),
    (lambda: ops.silu_glu(jnp.ones((2, 3)), jnp.ones((2, 4))), ValueError, "same shape"),
    (lambda: ops.gelu(jnp.ones(3), mult=0.0), ValueError, "mult must be"),
    (lambda: ops.layer_norm(jnp.ones((2, 3)), jnp.ones(4)), ValueError, r"shape \(3,\)"),
    (lambda: ops.scaled_dot_product_attention(jnp.ones((2, 3, 4)), jnp.ones((1, 2, 3, 4)),
                                              jnp.ones((1, 2, 3, 4))),
     ValueError, "rank 4"),
    (lambda: ops.scaled_dot_product_attention(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 2, 8)),
                                              jnp.ones((1, 3, 2, 8))),
     ValueError, "agree on batch and head_dim"),
    (lambda: ops.scaled_dot_product_attention(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 2, 4)),
                                              jnp.ones((1, 3, 2, 4)), mask=jnp.ones((3, 3))),
     TypeError, "mask must be boolean"),
    (lambda: ops.scaled_dot_product_attention(jnp.ones((1, 3, 2, 4)), jnp.ones((1, 3, 2, 4)),
                                              jnp.ones((1, 3, 2, 4)), mask=jnp.ones((5, 3), bool)),
     ValueError, "does not broadcast"),
    (lambda: ops.cross_entropy(jnp.ones((2, 5)), jnp.ones((3,), jnp.int32)),
     ValueError, "labels shape"),
    (lambda: ops.cross_entropy(jnp.ones((2, 5)), jnp.ones((2,))), TypeError, "integer"),
    (lambda: ops.mse_loss(jnp.ones((2, 5)), jnp.ones((5,))), ValueError, "same shape"),
    (lambda: ops.residual_split(jnp.ones(3), -1.0), ValueError, "tau must be"),
])
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_errors_raised_at_trace_time():
    f = jax.jit(lambda x, w: ops.linear(x, w))
    with pytest.raises(ValueError, match="does not match"):
        f.lower(jax.ShapeDtypeStruct((2, 8), jnp.float32),
                jax.ShapeDtypeStruct((4, 3), jnp.float32))
