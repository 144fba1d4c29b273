"""Optimizer state keeps shapes, dtypes and shardings across jitted updates on 8 CPU devices."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, optax
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from unitscale_jax.nn import TransformerDecoder, logical_rules, param_info, partition_specs
    from unitscale_jax.optim import adamw, sgd, unit_scale, warmup_cosine

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(jax.sharding.AxisType.Auto,) * 3)


    def main():
        model = TransformerDecoder(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                                   bias=True, parametric_norm=True, rngs=nnx.Rngs(0))
        info = param_info(model)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        params = nnx.as_pure(params)
        with nnx.logical_axis_rules(logical_rules("fsdp_tp", mesh)):
            specs = partition_specs(model)
        shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), nnx.as_pure(specs),
                                 is_leaf=lambda x: isinstance(x, P))
        params = jax.device_put(params, shardings)
        n_sharded = sum(not s.is_fully_replicated for s in jax.tree.leaves(shardings))
        assert n_sharded >= 6, n_sharded
        ids = jax.device_put(jax.random.randint(jax.random.key(0), (8, 16), 0, 64),
                             NamedSharding(mesh, P(("data", "fsdp"))))

        @jax.jit
        @jax.grad
        def grad_fn(p, ids):
            return nnx.merge(graphdef, p, rest).loss(ids)

        txs = {
            "unit_scale+optax.adamw": optax.chain(unit_scale(decay=0.9), optax.adamw(1e-2)),
            "inject(unit_scale+umup.adamw[bf16 mu])": optax.inject_hyperparams(
                lambda learning_rate: optax.chain(unit_scale(), adamw(
                    learning_rate, param_info=info, weight_decay=0.1, peak_learning_rate=0.5,
                    mu_dtype=jnp.bfloat16)))(learning_rate=0.5),
            "umup.sgd": sgd(warmup_cosine(0.5, 1, 10), param_info=info, momentum=0.9,
                            weight_decay=0.1, readout_constraint="to_output_scale"),
        }

        def describe(tree):
            leaves, treedef = jax.tree_util.tree_flatten(tree)
            return treedef, [(x.shape, x.dtype, x.sharding) for x in leaves]

        for name, tx in txs.items():
            # place the state like the parameters it mirrors (optax.tree.map_params), scalars
            # replicated; the updates must then keep every placement
            state_shardings = optax.tree.map_params(
                tx, lambda _, sh: sh, jax.eval_shape(tx.init, params), shardings,
                transform_non_params=lambda _: NamedSharding(mesh, P()))
            state = jax.jit(tx.init, out_shardings=state_shardings)(params)
            treedef0, desc0 = describe(state)

            @jax.jit
            def step(p, s, grads):  # no out_shardings: placements come from propagation
                u, s = tx.update(grads, s, p)
                return optax.apply_updates(p, u), s

            p = params
            for t in range(2):
                if name.startswith("inject") and t == 1:
                    state.hyperparams["learning_rate"] = jnp.asarray(0.1)
                grads = grad_fn(p, ids)  # the model's real gradients, sharded by the backward pass
                p, state = step(p, state, grads)
                treedef, desc = describe(state)
                assert treedef == treedef0, (name, treedef, treedef0)
                for (s0, d0, sh0), (s1, d1, sh1) in zip(desc0, desc):
                    assert s0 == s1 and d0 == d1, (name, s0, s1, d0, d1)
                    assert sh1.is_equivalent_to(sh0, len(s0)), (name, s0, sh0, sh1)
                for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
                    assert a.sharding.is_equivalent_to(b.sharding, a.ndim), (
                        name, a.sharding, b.sharding)
                    assert bool(jnp.all(jnp.isfinite(a)))
            # the moments follow the parameters' shardings
            sharded_state = sum(not x.sharding.is_fully_replicated for x in jax.tree.leaves(state))
            assert sharded_state >= n_sharded, (name, sharded_state)
            print("OK", name, len(desc0), "state leaves,", sharded_state, "sharded")

    with jax.set_mesh(mesh):
        main()
''')


def test_optimizer_state_keeps_shapes_dtypes_shardings_on_8_devices():
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "")
                                        + " --xla_force_host_platform_device_count=8").strip(),
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__)))))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("OK ") == 3, proc.stdout
