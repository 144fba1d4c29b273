"""Logical sharding names, rule tables, and a sharded decoder on 8 CPU devices (subprocess)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from unitscale_jax import nn as unn


def test_rules_and_specs():
    assert (unn.logical_to_spec(("batch", "sequence", "embed"), unn.LOGICAL_RULES["fsdp"])
            == P(("data", "fsdp"), None, None))
    # a mesh axis is used at most once: the later "embed" is replicated
    assert (unn.logical_to_spec(("embed", "mlp"), (("embed", "fsdp"), ("mlp", "fsdp")))
            == P("fsdp", None))
    with pytest.raises(ValueError, match="no rule"):
        unn.logical_to_spec(("nonsense",), unn.LOGICAL_RULES["dp"])
    mesh = jax.sharding.AbstractMesh((1, 1), ("data", "tensor"))
    rules = dict(unn.logical_rules("fsdp_tp", mesh))
    assert rules["batch"] == "data" and rules["embed"] is None and rules["heads"] == "tensor"
    with pytest.raises(ValueError, match="unknown sharding rule"):
        unn.logical_rules("zero3")
    model = nnx.eval_shape(lambda: unn.TransformerDecoder(
        vocab_size=64, d_model=16, n_layers=2, n_heads=2, rngs=nnx.Rngs(0)))
    specs = {tuple(p): s for p, s in
             nnx.to_flat_state(unn.partition_specs(model, unn.LOGICAL_RULES["fsdp_tp"]))}
    assert specs[("embed", "embedding")] == P("tensor", "fsdp")
    assert specs[("readout", "kernel")] == P("fsdp", "tensor")
    assert specs[("stack", "layers", "attn", "qkv_proj", "kernel")] == P(None, "fsdp", "tensor")
    assert specs[("stack", "layers", "mlp", "down_proj", "kernel")] == P(None, "tensor", "fsdp")
    x = jnp.ones((2, 3, 4))
    assert unn.constrain(x, ("batch", "sequence", "embed")) is x  # no mesh: no-op
    with pytest.raises(ValueError, match="axis names"):
        unn.constrain(x, ("batch",))


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from unitscale_jax import nn as unn

    assert jax.device_count() == 8
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)
    cfg = unn.TransformerConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=16)
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    ref_model = unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(ref_model, nnx.Param)
    loss_fn = lambda p, i: nnx.merge(graphdef, p).loss(i)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn))(params, ids)
    for kind in ("fsdp_tp",):
        rules = unn.logical_rules(kind, mesh)
        with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
            shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), unn.partition_specs(params))
            p = jax.device_put(params, shardings)
            i = jax.device_put(ids, NamedSharding(mesh, unn.logical_to_spec(("batch", "sequence"))))
            step = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, shardings))
            loss, grads = step(p, i)
            # parameters built under a mesh and rules are sharded at creation (scanned too)
            eager = unn.TransformerDecoder(cfg, rngs=nnx.Rngs(0))
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
        kernel = eager.stack.layers.mlp.up_proj.kernel[...]
        expect = unn.logical_to_spec(("layers", "embed", "mlp"), rules)
        want = NamedSharding(mesh, expect)
        assert kernel.sharding.is_equivalent_to(want, 3), (kind, kernel.sharding, expect)
        g = grads["stack"]["layers"]["mlp"]["up_proj"]["kernel"][...]
        assert g.sharding.is_equivalent_to(want, 3), (kind, g.sharding, expect)
        assert expect == P(None, "fsdp", "tensor")
        print(kind, "ok", float(loss))
""")


def test_sharded_decoder_on_8_devices():
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                        + " --xla_force_host_platform_device_count=8").strip(),
               JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    assert out.stdout.count(" ok ") == 1
