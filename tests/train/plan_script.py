"""Run by test_plan.py in a subprocess with 4 fake CPU devices: plans small runs and compiles
the real Trainer's step of the same runs (real data, real state); prints both as JSON."""

import contextlib
import io
import json
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unitscale_jax import train
from unitscale_jax.cli import main
from unitscale_jax.train import plan as planner
from unitscale_jax.train import step as steplib

tfds_dir, out_dir, rss_config = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
assert jax.device_count() == 4, jax.devices()
results = {}

# cost_analysis of a sharded program is per device: a row-sharded [M, K] @ [K, N] on 4 devices
mesh = jax.make_mesh((4,), ("x",))
a = jax.ShapeDtypeStruct((512, 256), jnp.float32, sharding=NamedSharding(mesh, P("x", None)))
b = jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=NamedSharding(mesh, P()))
matmul = jax.jit(jnp.matmul, out_shardings=NamedSharding(mesh, P("x", None))).lower(a, b).compile()
results["matmul"] = {"flops": planner._cost(matmul)["flops"], "global": 2 * 512 * 256 * 128}

BASE = train.get_preset("tiny").replace(
    model={"d_model": 32, "n_layers": 3, "n_heads": 4, "attention_impl": "xla"},
    data={"seq_len": 32, "data_dir": tfds_dir},
    training={"steps": 2, "batch_size": 8, "eval_every": 0, "checkpoint": False,
              "progress": False, "tensorboard": False, "plot": False})


def real_step(cfg, name):
    """Memory, cost and collectives of the real Trainer's compiled step (its built state and
    a batch of its data)."""
    trainer = train.Trainer(cfg.replace(training={"run_dir": f"{out_dir}/{name}"}), quiet=True,
                            devices=jax.devices()[:4])
    trainer.build_state()
    batch = steplib.put_batch(next(trainer.train_it), trainer.par)
    with trainer.par.context():
        compiled = trainer._train_step.lower(trainer.state, batch).compile()
    trainer.close()
    mem = compiled.memory_analysis()
    return {"argument_bytes": mem.argument_size_in_bytes, "output_bytes": mem.output_size_in_bytes,
            "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes,
            **planner._cost(compiled),
            "collectives": planner.hlo_profile(compiled.as_text(), 4)["collectives"]}


for name, model, mesh_text in [("unscanned", {"scan_layers": False}, "fsdp=4"),
                               ("scanned", {"scan_layers": True}, "fsdp=4")]:
    cfg = BASE.replace(model=model)
    sizes = planner.parse_mesh(mesh_text)
    kind, tp = planner.mesh_sharding(sizes)
    p = planner.plan(cfg, sizes, vocab_size=260, accelerator="tpu-v5p")
    real = real_step(cfg.replace(training={"sharding": kind, "tensor_parallel": tp}), name)
    results[name] = {"plan": p, "real": real}

cfg = BASE.replace(model={"n_layers": 2, "scan_layers": True},
                   training={"microbatches": 4})
sizes = planner.parse_mesh("fsdp=2,stage=2")
p = planner.plan(cfg, sizes, vocab_size=260, accelerator="tpu-v5p")
real = real_step(cfg.replace(training={"sharding": "fsdp", "pipeline_stages": 2}), "pipelined")
results["pipelined"] = {"plan": p, "real": real}

# the plan of the run whose resident memory test_plan.py measures
rss_cfg = train.get_preset("tiny").replace(**rss_config)
results["rss_plan"] = planner.plan(rss_cfg, planner.parse_mesh("fsdp=4"), vocab_size=260)

err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["plan", "--preset", "tiny", "--d-model", "32", "--n-layers", "1",
               "--seq-len", "16", "--batch-size", "4", "--mesh", "fsdp=4",
               "--accelerator", "h100", "--json", f"{out_dir}/plan.json"])
results["cli"] = {"rc": rc, "stderr": err.getvalue()}
err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["plan", "--preset", "tiny", "--batch-size", "6", "--mesh", "fsdp=4"])
results["bad_batch"] = {"rc": rc, "stderr": err.getvalue()}
print("RESULTS " + json.dumps(results))
