"""Run by test_pmap_step.py in a subprocess with 8 fake CPU devices: trains each config a few
steps with the Trainer's ``jit`` + mesh step (``--sharding dp``) and with the ``pmap`` step
(``unitscale_jax.train.pmap_step``) on the same batches; prints the curves and the parameter
differences as JSON."""

import json
import sys

import jax
import numpy as np
from flax import nnx

from unitscale_jax import train
from unitscale_jax.train import pmap_step

tfds_dir, out_dir, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
assert jax.device_count() == 8, jax.devices()
CONFIGS = {  # u-muP AdamW after unit_scale(); u-muP and SP SGD (not scale-invariant) on MLM,
    # whose devices score different numbers of masked tokens
    "umup_adamw_unit_scale": {"model": {"kind": "decoder", "parametrization": "umup"},
                              "optimizer": {"name": "adamw", "unit_scale_grads": True}},
    "umup_sgd_mlm": {"model": {"kind": "encoder", "parametrization": "umup"},
                     "optimizer": {"name": "sgd"}},
    "sp_sgd_mlm": {"model": {"kind": "encoder", "parametrization": "sp"},
                   "optimizer": {"name": "sgd", "lr": 0.5}},
}


def leaves(tree):
    return [np.asarray(a, np.float64) for a in jax.tree.leaves(tree)]


def max_rel_diff(a, b):
    """Per leaf, max |a - b| over max |b|; the largest over the leaves."""
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(y)), 1e-30))
               for x, y in zip(leaves(a), leaves(b)))


def compare(name, overrides):
    cfg = train.get_preset("tiny").replace(
        model={"d_model": 32, "n_layers": 1, "n_heads": 4, **overrides["model"]},
        data={"seq_len": 32, "data_dir": tfds_dir},
        optimizer={"warmup_steps": 1, **overrides["optimizer"]},
        training={"steps": steps, "batch_size": 16, "checkpoint": False, "progress": False,
                  "tensorboard": False, "plot": False, "sharding": "dp",
                  "run_dir": f"{out_dir}/{name}"})
    trainer = train.Trainer(cfg, quiet=True)
    trainer.build_state()
    batches = [next(trainer.train_it) for _ in range(steps)]
    init_jit = jax.device_get(trainer.state["params"])
    jit_rows = [jax.device_get(trainer.step(b)) for b in batches]
    params_jit = jax.device_get(trainer.state["params"])

    step, state, graphdef = pmap_step.make_pmap_train_step(cfg, trainer.data.vocab_size)
    init_pmap = jax.device_get(pmap_step.unreplicate(state)["params"])
    pmap_rows = []
    for b in batches:
        state, m = step(state, pmap_step.shard_batch(b))
        pmap_rows.append(jax.device_get(m))
    stacked = jax.device_get(state["params"])
    model = pmap_step.model_of(graphdef, state)
    return {
        "leading_axes": sorted({np.shape(a)[0] for a in jax.tree.leaves(state)}),
        "init_rel_diff": max_rel_diff(init_pmap, init_jit),
        "moved_rel": max_rel_diff(params_jit, init_jit),
        "params_rel_diff": max_rel_diff(pmap_step.unreplicate(stacked), params_jit),
        "replica_spread": max(float(np.max(np.ptp(a, axis=0))) for a in leaves(stacked)),
        "model_rel_diff": max_rel_diff(nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                       pmap_step.unreplicate(stacked)),
        "jit": {k: [float(r[k]) for r in jit_rows]
                for k in ("loss", "grad_norm", "lr", "scored_tokens")},
        "pmap": {k: [np.asarray(r[k]).tolist() for r in pmap_rows]
                 for k in ("loss", "grad_norm", "lr", "scored_tokens")},
        "per_device_tokens": [np.asarray(jax.device_get(b["where"])).reshape(8, -1).sum(1)
                              .tolist() for b in batches],
    }


print("RESULTS " + json.dumps({name: compare(name, o) for name, o in CONFIGS.items()}))
