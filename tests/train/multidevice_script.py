"""Run by test_multidevice.py in a subprocess with 8 fake CPU devices: trains the same tiny
config on 1 device and on 8 (dp, fsdp, tp, fsdp_tp); prints the curves as JSON."""

import contextlib
import io
import json
import sys

import jax

from unitscale_jax import train
from unitscale_jax.cli import main

tfds_dir, out_dir = sys.argv[1], sys.argv[2]
assert jax.device_count() == 8, jax.devices()
cfg = train.get_preset("tiny").replace(
    model={"d_model": 32, "n_layers": 1, "n_heads": 4},
    data={"seq_len": 32, "data_dir": tfds_dir},
    training={"steps": 8, "batch_size": 8, "eval_every": 4, "eval_batches": 1,
              "checkpoint_every": 0, "progress": False, "tensorboard": False, "plot": False})
results = {}
for name, devices, sharding in [("one", jax.devices()[:1], "dp"), ("dp", None, "dp"),
                                ("fsdp", None, "fsdp"), ("tp", None, "tp"),
                                ("fsdp_tp", None, "fsdp_tp")]:
    c = cfg.replace(training={"sharding": sharding, "run_dir": f"{out_dir}/{name}"})
    s = train.run(c, quiet=True, devices=devices)
    h = s["history"]
    results[name] = {"devices": s["devices"], "sharded_params": s["sharded_params"],
                     "train": [r["loss"] for r in h if r["split"] == "train"],
                     "grad_norm": [r["grad_norm"] for r in h if r["split"] == "train"],
                     "val": [r["loss"] for r in h if r["split"] == "validation"]}

err = io.StringIO()
with contextlib.redirect_stderr(err):
    rc = main(["train", "--batch-size", "12", "--data-dir", tfds_dir, "--run-dir",
               f"{out_dir}/bad", "--no-progress"])
results["bad_batch"] = {"rc": rc, "stderr": err.getvalue()}
print("RESULTS " + json.dumps(results))
