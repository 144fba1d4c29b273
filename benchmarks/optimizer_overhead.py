"""Cost of one optimizer update: unit_scale / u-muP AdamW against plain ``optax.adamw``.

One jitted update (``tx.update`` then ``optax.apply_updates``, parameters and state donated) on
the parameters of a ~25M-parameter ``unitscale_jax.nn.TransformerDecoder`` (d_model 512, 6
layers, SwiGLU, byte vocabulary; scanned layers, so the stacked leaves are as in training),
with fixed random gradients, for:

- ``optax.adamw``: plain AdamW (the baseline);
- ``unit_scale+optax.adamw``: ``optax.chain(unit_scale(), optax.adamw(lr))``;
- ``umup.adamw``: ``unitscale_jax.optim.adamw(lr, param_info=...)`` (same weight decay).

Runs are interleaved round-robin (so drift on a shared machine hits all alike). Reported per
variant: the median and minimum time over ``--runs`` rounds, the median over rounds of the
per-round ratio to plain AdamW (robust to load drift; target <= 1.05), and the bytes XLA's
cost analysis counts for the compiled update (a deterministic measure of memory traffic, which
bounds an optimizer update). Written, with a machine description (load average included),
to ``benchmarks/results/optimizer_overhead.json``.

    python benchmarks/optimizer_overhead.py [--runs 30] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from unitscale_jax.nn import TransformerDecoder, param_info  # noqa: E402
from unitscale_jax.optim import adamw, unit_scale  # noqa: E402

RESULT = Path(__file__).resolve().parent / "results" / "optimizer_overhead.json"


def machine() -> dict:
    dev = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device": getattr(dev, "device_kind", str(dev)),
        "device_count": jax.device_count(),
    }


def build(d_model: int, layers: int):
    model = TransformerDecoder(vocab_size=256, d_model=d_model, n_layers=layers,
                               n_heads=d_model // 64, max_seq_len=512, rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return params, param_info(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--quick", action="store_true", help="d_model 128, 2 layers, 5 runs (smoke)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.layers, args.runs = 128, 2, 5

    params, info = build(args.d_model, args.layers)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    print(f"{n_params / 1e6:.2f}M parameters in {len(leaves)} leaves, {jax.devices()[0]}")

    txs = {
        "optax.adamw": optax.adamw(args.lr, weight_decay=1e-4),
        "unit_scale+optax.adamw": optax.chain(unit_scale(), optax.adamw(args.lr, weight_decay=1e-4)),
        "umup.adamw": adamw(args.lr, param_info=info, weight_decay=1e-4),
    }
    runners, bytes_accessed = {}, {}
    for name, tx in txs.items():
        def step(p, s, g, tx=tx):
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        state = tx.init(params)
        f = jax.jit(step, donate_argnums=(0, 1))
        cost = f.lower(params, state, grads).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        bytes_accessed[name] = float(cost.get("bytes accessed", float("nan")))
        box = {"p": jax.tree.map(jnp.copy, params), "s": state}

        def run(f=f, box=box):
            box["p"], box["s"] = f(box["p"], box["s"], grads)
            return box["p"]

        runners[name] = run

    for run in runners.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(run())
    times = {k: [] for k in runners}
    for _ in range(args.runs):
        for k, run in runners.items():
            t0 = time.perf_counter()
            jax.block_until_ready(run())
            times[k].append(time.perf_counter() - t0)

    base = "optax.adamw"
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    paired = {k: statistics.median(a / b for a, b in zip(v, times[base])) for k, v in times.items()}
    traffic = {k: v / bytes_accessed[base] for k, v in bytes_accessed.items()}
    for k in runners:
        print(f"{k:24s} median {med[k] * 1e3:8.2f} ms  min {best[k] * 1e3:8.2f} ms  "
              f"ratio (paired median) {paired[k]:.3f}x  bytes {bytes_accessed[k] / 1e6:7.1f} MB "
              f"({traffic[k]:.3f}x)")
    result = {
        "machine": machine(),
        "command": "python benchmarks/optimizer_overhead.py " + " ".join(sys.argv[1:]),
        "config": {"d_model": args.d_model, "layers": args.layers, "vocab": 256,
                   "n_params": int(n_params), "n_leaves": len(leaves), "runs": args.runs,
                   "lr": args.lr, "weight_decay": 1e-4},
        "median_ms": {k: round(v * 1e3, 4) for k, v in med.items()},
        "min_ms": {k: round(v * 1e3, 4) for k, v in best.items()},
        "ratio_to_optax_adamw_paired_median": {k: round(v, 4) for k, v in paired.items()},
        "ratio_to_optax_adamw_of_medians": {k: round(v / med[base], 4) for k, v in med.items()},
        "xla_bytes_accessed_MB": {k: round(v / 1e6, 2) for k, v in bytes_accessed.items()},
        "xla_bytes_ratio_to_optax_adamw": {k: round(v, 4) for k, v in traffic.items()},
        "target_ratio": 1.05,
    }
    if not args.no_write:
        RESULT.parent.mkdir(parents=True, exist_ok=True)
        RESULT.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {RESULT}")


if __name__ == "__main__":
    main()
