"""Run by test_plan.py in a fresh process: ``idle`` starts JAX (4 CPU devices, the same
imports as a run) and does nothing; ``run CONFIG`` trains the config for its few steps. Prints
the process's peak resident memory in bytes: ``VmHWM`` of ``/proc/self/status``, the peak of
this program's own address space. (``ru_maxrss`` is not: Linux carries the high-water mark of
the address space an ``exec`` replaced, here the pytest worker's that spawned this process,
so it can read the parent's peak.)"""

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


def peak_rss() -> int:
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM:"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


print("MAXRSS", peak_rss())
