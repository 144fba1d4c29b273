"""Overhead of unit scaling on a jitted FFN block, forward + backward.

The unit-scaled block (``ops.linear -> ops.gelu -> ops.linear``) against the same block written
with plain ``jnp``, same shapes, timed round-robin in one process; the target is a time ratio
<= 1.02 (the scales must fuse into the surrounding ops).

    python benchmarks/ops_overhead.py [--width 512] [--batch 4096] [--runs 30]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import interleaved_medians, write_result  # noqa: E402
from unitscale_jax import ops  # noqa: E402


def unit_scaled_block(x, w_up, w_down):
    return ops.linear(ops.gelu(ops.linear(x, w_up)), w_down)


def plain_block(x, w_up, w_down):
    return jax.nn.gelu(x @ w_up, approximate=False) @ w_down


def fwd_bwd(block):
    def step(x, w_up, w_down, g):
        y, vjp = jax.vjp(block, x, w_up, w_down)
        return y, vjp(g)
    return jax.jit(step)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    dt = jnp.dtype(args.dtype)
    k = jax.random.split(jax.random.key(0), 4)
    d, f = args.width, 4 * args.width
    x = jax.random.normal(k[0], (args.batch, d), dt)
    w_up = jax.random.normal(k[1], (d, f), dt)
    w_down = jax.random.normal(k[2], (f, d), dt)
    g = jax.random.normal(k[3], (args.batch, d), dt)
    steps = {name: fwd_bwd(b)
             for name, b in (("unit_scaled", unit_scaled_block), ("plain", plain_block))}
    fns = {name: (lambda s=s: s(x, w_up, w_down, g)) for name, s in steps.items()}
    med = interleaved_medians(fns, args.runs)
    ratio = med["unit_scaled"] / med["plain"]
    print(f"FFN block fwd+bwd, width {d}, hidden {f}, batch {args.batch}, {args.dtype}, "
          f"{jax.default_backend()}, median of {args.runs}")
    print(f"  plain jnp    {med['plain'] * 1e3:8.2f} ms")
    print(f"  unit-scaled  {med['unit_scaled'] * 1e3:8.2f} ms")
    print(f"  ratio unit-scaled / plain = {ratio:.3f}  (target <= 1.02)")
    result = {"benchmark": "ops_overhead", "width": d, "batch": args.batch, "dtype": args.dtype,
              "runs": args.runs, "median_s": med, "ratio": ratio, "target": 1.02}
    if not args.no_write:
        print(f"  written to {write_result('ops_overhead', result)}")
    return result


if __name__ == "__main__":
    main()
