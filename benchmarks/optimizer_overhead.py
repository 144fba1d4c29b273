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

XLA counts both branches of a ``lax.cond`` in its byte count, so the unit_scale figure includes
the exact two-pass fallback (max-abs then mean square) that runs only at step 1 or after a jump
of more than ~2^30 in a leaf's RMS; the steady state reads each gradient once more than AdamW.

``--train-steps N`` also times N whole training steps (the trainer's ``make_train_step``:
forward, backward, update, gradient norm) of the same model on a batch of ``--batch`` x
``--seq`` tokens for each optimizer: the cost a user sees.

    python benchmarks/optimizer_overhead.py [--runs 30] [--train-steps 5] [--quick] [--no-write]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._timing import (  # noqa: E402
    interleaved_times,
    paired_ratios,
    train_step_runner,
    write_result,
)
from unitscale_jax.nn import TransformerDecoder, param_info  # noqa: E402
from unitscale_jax.optim import adamw, unit_scale  # noqa: E402

FLOOR = "one read of the gradients"


def build(d_model: int, layers: int):
    model = TransformerDecoder(vocab_size=256, d_model=d_model, n_layers=layers,
                               n_heads=max(1, d_model // 64), max_seq_len=512, rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    return model, params, param_info(model)


def train_step_times(model, txs: dict, batch: int, seq: int, runs: int, lr: float) -> dict:
    """Per-round times of one jitted train step (the trainer's: loss, grad, update, gradient
    norm) per optimizer."""
    ids = jax.random.randint(jax.random.key(1), (batch, seq), 0, 256)
    fns = {name: train_step_runner(model, tx, ids, lr=lr) for name, tx in txs.items()}
    return interleaved_times(fns, runs, warmup=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--train-steps", type=int, default=0,
                   help="also time this many whole train steps per optimizer (0: skip)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="d_model 128, 2 layers, 5 runs (smoke)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.d_model, args.layers, args.runs = 128, 2, 5

    model, params, info = build(args.d_model, args.layers)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    grads = treedef.unflatten([jax.random.normal(k, x.shape, x.dtype)
                               for k, x in zip(keys, leaves)])
    print(f"{n_params / 1e6:.2f}M parameters in {len(leaves)} leaves, {jax.devices()[0]}")

    def make_txs():
        return {
            "optax.adamw": optax.adamw(args.lr, weight_decay=1e-4),
            "unit_scale+optax.adamw": optax.chain(unit_scale(),
                                                  optax.adamw(args.lr, weight_decay=1e-4)),
            "umup.adamw": adamw(args.lr, param_info=info, weight_decay=1e-4),
        }

    runners, bytes_accessed = {}, {}
    for name, tx in make_txs().items():
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

    # The floor for any exact per-step normaliser in front of an optimizer: one read of every
    # gradient (its mean square) before the optimizer's own passes. Timed alone, side by side.
    read_once = jax.jit(lambda g: [jnp.mean(jnp.square(x)) for x in jax.tree.leaves(g)])
    runners[FLOOR] = lambda: read_once(grads)

    base = "optax.adamw"
    times = interleaved_times(runners, args.runs)
    floor = times.pop(FLOOR)
    del runners[FLOOR]
    floor_ratio = statistics.median(1 + f / b for f, b in zip(floor, times[base]))
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    paired = paired_ratios(times, base)
    traffic = {k: v / bytes_accessed[base] for k, v in bytes_accessed.items()}
    for k in runners:
        print(f"{k:24s} median {med[k] * 1e3:8.2f} ms  min {best[k] * 1e3:8.2f} ms  "
              f"ratio (paired median) {paired[k]:.3f}x  bytes {bytes_accessed[k] / 1e6:7.1f} MB "
              f"({traffic[k]:.3f}x)")
    result = {
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
        "floor_one_extra_read": {
            "what": "1 + (time of one mean-square pass over every gradient) / (optax.adamw update "
                    "time), per round, median: the least any transform that normalises each leaf "
                    "by its current RMS can add in front of optax.adamw",
            "median_ms_one_read": round(statistics.median(floor) * 1e3, 4),
            "ratio": round(floor_ratio, 4),
        },
    }
    print(f"floor: one mean-square read of every gradient {statistics.median(floor) * 1e3:.2f} ms"
          f" -> {floor_ratio:.3f}x optax.adamw at best for an exact per-step normaliser")
    if args.train_steps:
        del runners
        t = train_step_times(model, make_txs(), args.batch, args.seq, args.train_steps, args.lr)
        tp = paired_ratios(t, base)
        for k, v in t.items():
            print(f"train step {k:24s} median {statistics.median(v) * 1e3:8.1f} ms  "
                  f"ratio (paired median) {tp[k]:.3f}x")
        result["train_step"] = {
            "batch": args.batch, "seq": args.seq, "runs": args.train_steps,
            "median_ms": {k: round(statistics.median(v) * 1e3, 2) for k, v in t.items()},
            "ratio_to_optax_adamw_paired_median": {k: round(v, 4) for k, v in tp.items()},
        }
    if not args.no_write:
        print(f"wrote {write_result('optimizer_overhead', result)}")


if __name__ == "__main__":
    main()
