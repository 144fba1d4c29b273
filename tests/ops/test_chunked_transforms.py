"""The chunked attention backend under JAX's transforms: ``jax.jit`` with inputs sharded over
a 4-device CPU mesh (batch and heads axes), ``jax.checkpoint`` (and the model's ``remat``),
and ``jax.vmap`` over an extra leading axis: the values and q, k, v gradients of ``"xla"``."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from tests.nn.helpers import loss_and_grads, random_ids
from unitscale_jax import nn as unn
from unitscale_jax.ops import plain


def _rand(key, shape):
    return jax.random.normal(jax.random.key(key), shape)


def _qkv(lead=()):
    return (_rand(0, (*lead, 2, 37, 4, 8)), _rand(1, (*lead, 2, 45, 2, 8)),
            _rand(2, (*lead, 2, 45, 2, 8)))


def _attn(impl, causal):
    return lambda q, k, v: plain.dot_product_attention(
        q, k, v, logit_scale=0.3, is_causal=causal, implementation=impl, block_q=16,
        block_kv=16)


def _value_and_grads(f, q, k, v):
    """``sum(f * w)`` for a fixed random ``w`` and its q, k, v gradients."""
    w = _rand(99, q.shape)
    return jax.value_and_grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2))(q, k, v)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_under_checkpoint(causal):
    q, k, v = _qkv()
    policy = jax.checkpoint_policies.nothing_saveable       # recompute everything
    remat = jax.jit(lambda *a: _value_and_grads(
        jax.checkpoint(_attn("chunked", causal), policy=policy), *a))
    chex.assert_trees_all_close(remat(q, k, v), _value_and_grads(_attn("xla", causal), q, k, v),
                                rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_chunked_under_vmap(causal):
    """vmap over a leading axis of size 3 (each slice its own batch), with a padding mask
    that differs per slice."""
    q, k, v = _qkv((3,))
    mask = jnp.arange(45)[None, None, None, None, :] < jnp.array([45, 30, 11])[:, None, None,
                                                                             None, None]

    def f(impl):
        return lambda q, k, v, m: plain.dot_product_attention(
            q, k, v, logit_scale=0.3, mask=m, is_causal=causal, implementation=impl,
            block_q=16, block_kv=16)

    def run(impl):
        return jax.jit(lambda *a: _value_and_grads(
            lambda q, k, v: jax.vmap(f(impl))(q, k, v, mask), *a))(q, k, v)

    chex.assert_trees_all_close(run("chunked"), run("xla"), rtol=1e-5, atol=2e-6)
    y = jax.jit(jax.vmap(f("chunked")))(q, k, v, mask)
    for i in range(3):   # each slice is attention over its own batch and mask
        chex.assert_trees_all_close(y[i], f("xla")(q[i], k[i], v[i], mask[i]), rtol=1e-5,
                                    atol=2e-6)


def test_chunked_decoder_with_remat_same_loss_and_gradients_as_xla():
    cfg = unn.TransformerConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                max_seq_len=40, remat=True, attention_block_q=16,
                                attention_block_kv=16)
    ids = random_ids(1, (2, 40), 64)

    def loss(m, ids):
        return m.loss(ids)

    la, ga = loss_and_grads(unn.TransformerDecoder(cfg, attention_impl="chunked",
                                                   rngs=nnx.Rngs(0)), loss, ids)
    lb, gb = loss_and_grads(unn.TransformerDecoder(cfg, attention_impl="xla", remat=False,
                                                   rngs=nnx.Rngs(0)), loss, ids)
    chex.assert_trees_all_close(la, lb, rtol=1e-6)
    chex.assert_trees_all_close(ga, gb, rtol=2e-4, atol=2e-6)


SCRIPT = textwrap.dedent("""
    import chex, jax, jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P
    from unitscale_jax.ops import plain

    assert jax.device_count() == 4
    rand = lambda i, s: jax.random.normal(jax.random.key(i), s)
    q, k, v = rand(0, (4, 37, 4, 8)), rand(1, (4, 45, 2, 8)), rand(2, (4, 45, 2, 8))
    w = rand(9, q.shape)
    mask = jnp.arange(45)[None, None, None, :] < jnp.array([45, 30, 20, 44])[:, None, None, None]
    T = jax.sharding.AxisType
    for axis_type, causal in ((T.Auto, True), (T.Explicit, False), (T.Explicit, True)):
        mesh = jax.make_mesh((2, 2), ("data", "tensor"), axis_types=(axis_type,) * 2)
        spec = NamedSharding(mesh, P("data", None, "tensor", None))   # batch, heads sharded
        def run(impl, *args):
            def f(q, k, v, m):
                y = plain.dot_product_attention(q, k, v, logit_scale=0.3, mask=m,
                                                is_causal=causal, implementation=impl,
                                                block_q=16, block_kv=16)
                return jnp.sum(y * w)
            return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2)))(*args)
        ref = run("xla", q, k, v, mask)
        with jax.set_mesh(mesh):
            args = [jax.device_put(t, spec) for t in (q, k, v)]
            args.append(jax.device_put(mask, NamedSharding(mesh, P("data"))))
            out = run("chunked", *args)
        assert out[1][0].sharding.spec == spec.spec, out[1][0].sharding
        assert len(out[1][1].addressable_shards) == 4
        chex.assert_trees_all_close(jax.device_get(out), ref, rtol=1e-5, atol=2e-6)
        print(axis_type, "causal", causal, "ok")
""")


def test_chunked_sharded_over_a_4_device_mesh():
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                        + " --xla_force_host_platform_device_count=4").strip(),
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    assert out.stdout.count(" ok") == 3, out.stdout
