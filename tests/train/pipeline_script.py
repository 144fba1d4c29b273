"""Run by test_pipeline.py in a subprocess with 8 fake CPU devices: the loss and every
gradient of pipelined models against the unpipelined ones (gpipe and circular, with data and
fsdp sharding, a padded encoder), then a pipelined ``train`` run against the unpipelined run,
and two bad-flag runs; prints the measurements as JSON."""

import contextlib
import io
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from unitscale_jax import nn
from unitscale_jax.cli import main
from unitscale_jax.train import step as steplib

tfds_dir, out_dir = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8, jax.devices()
V, B, S = 64, 16, 16
k_ids, k_valid = jax.random.split(jax.random.key(1))
ids = jax.random.randint(k_ids, (B, S), 0, V)
lengths = jax.random.randint(k_valid, (B,), S // 2, S + 1)  # padded rows for the encoder
valid = jnp.arange(S)[None, :] < lengths[:, None]
batch = {"ids": ids, "valid": valid, "where": valid & (ids % 3 == 0)}
losses = {
    "decoder": lambda model, b: model.loss(b["ids"]),
    "encoder": lambda model, b: model.mlm_loss(b["ids"], b["ids"], b["where"], mask=b["valid"]),
}
models = {
    "decoder": nn.TransformerDecoder(vocab_size=V, d_model=32, n_layers=4, n_heads=2,
                                     max_seq_len=S, rngs=nnx.Rngs(0)),
    "encoder": nn.TransformerEncoder(vocab_size=V, d_model=32, n_layers=4, n_heads=2,
                                     max_seq_len=S, rngs=nnx.Rngs(0)),
}


def value_and_grads(kind, par=None):
    graphdef, params = nnx.split(models[kind], nnx.Param)
    pure = nnx.to_pure_dict(params)

    def loss(p, b):
        return losses[kind](nnx.merge(graphdef, p), b)

    if par is None:
        return jax.jit(jax.value_and_grad(loss))(pure, batch), None
    shardings = steplib.param_shardings(params, par)
    with par.context():
        f = jax.jit(jax.value_and_grad(loss), in_shardings=(shardings, par.batch))
        out = f(jax.device_put(pure, shardings), jax.device_put(batch, par.batch))
    return out, shardings


reference = {kind: value_and_grads(kind)[0] for kind in models}
equivalence = {}
for name, kind, sharding, stages, micro, schedule, chunks in [
        ("gpipe 2 stages x 4 data", "decoder", "dp", 2, 4, "gpipe", 1),
        ("gpipe 4 stages x 2 data", "decoder", "dp", 4, 2, "gpipe", 1),
        ("circular 2 stages x 4 data", "decoder", "dp", 2, 2, "circular", 2),
        ("gpipe 2 stages x 4 fsdp, padded encoder", "encoder", "fsdp", 2, 2, "gpipe", 1)]:
    par = steplib.make_parallel(sharding, pipeline_stages=stages, microbatches=micro,
                                pipeline_schedule=schedule, pipeline_chunks=chunks)
    (loss, grads), shardings = value_and_grads(kind, par)
    ref_loss, ref_grads = reference[kind]
    rel = jax.tree.map(lambda g, r: float(jnp.max(jnp.abs(g - r)) / jnp.max(jnp.abs(r))),
                       grads, ref_grads)
    layer_specs = [s.spec for path, s in jax.tree_util.tree_flatten_with_path(shardings)[0]
                   if "layers" in jax.tree_util.keystr(path)]
    equivalence[name] = {
        "loss": float(loss), "loss_rel": abs(float(loss) - float(ref_loss)) / float(ref_loss),
        "grad_rel": max(jax.tree.leaves(rel)), "n_grads": len(jax.tree.leaves(rel)),
        "n_params": len(jax.tree.leaves(nnx.state(models[kind], nnx.Param))),
        "layers_sharded_over_stage": bool(layer_specs) and all(
            s[0] == "stage" for s in layer_specs),
        "bubble": par.pipeline.schedule.bubble_fraction()}


def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        rc = main(["train", *map(str, args)])
    return rc, out.getvalue(), err.getvalue()


small = ["--d-model", 32, "--n-layers", 2, "--n-heads", 2, "--seq-len", 32, "--steps", 6,
         "--eval-every", 3, "--eval-batches", 1, "--checkpoint-every", 0, "--data-dir",
         tfds_dir, "--no-progress", "--no-tensorboard", "--no-plot"]
runs = {}
for name, extra in [("unpipelined", []),
                    ("pipelined", ["--pipeline-stages", 2, "--microbatches", 4])]:
    rc, log, err = cli(*small, "--batch-size", 16, "--run-dir", f"{out_dir}/{name}", *extra)
    rows = [json.loads(x) for x in open(f"{out_dir}/{name}/metrics.jsonl")] if rc == 0 else []
    runs[name] = {"rc": rc, "log": log, "stderr": err,
                  "train": [r["loss"] for r in rows if r["split"] == "train"],
                  "grad_norm": [r["grad_norm"] for r in rows if r["split"] == "train"],
                  "val": [r["loss"] for r in rows if r["split"] == "validation"]}

results = {"equivalence": equivalence, "train": runs}
for name, extra in [("bad_microbatches", ["--batch-size", 8, "--pipeline-stages", 2,
                                          "--microbatches", 4]),
                    ("bad_stages", ["--batch-size", 8, "--pipeline-stages", 3, "--n-layers", 3,
                                    "--microbatches", 1]),
                    ("bad_teacher", ["--batch-size", 16, "--pipeline-stages", 4, "--n-layers", 4,
                                     "--microbatches", 2, "--distill-from",
                                     f"{out_dir}/unpipelined"])]:
    rc, _, err = cli(*small, "--run-dir", f"{out_dir}/{name}", *extra)
    results[name] = {"rc": rc, "stderr": err}
print("RESULTS " + json.dumps(results))
