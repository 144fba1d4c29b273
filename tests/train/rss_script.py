"""Run by test_plan.py in a fresh process: ``idle`` starts JAX (4 CPU devices, the same
imports as a run) and does nothing; ``run CONFIG`` trains the config for its few steps. Prints
the process's peak resident memory (``ru_maxrss``) in bytes."""

import json
import resource
import sys

import jax
import jax.numpy as jnp

from unitscale_jax import train

mode = sys.argv[1]
assert jax.device_count() == 4
jax.block_until_ready([jax.device_put(jnp.ones(1), d) for d in jax.devices()])
if mode == "run":
    cfg = train.get_preset("tiny").replace(**json.loads(sys.argv[2]))
    train.run(cfg, quiet=True)
print("MAXRSS", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
