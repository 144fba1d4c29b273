"""Real FP8 against bf16: matmul throughput and a u-muP decoder train step.

1. Matmuls ``[M, K] @ [K, N]``: ``jnp.dot`` on bfloat16 operands against
   ``unitscale_jax.precision.fp8_dot`` (operands cast to float8 E4M3 with static scale 1 --
   unit scaling's -- inside the timed function, float32 accumulation, bfloat16 result), and
   the bare float8 GEMM on operands cast beforehand; forward alone and forward + backward
   (the two backward matmuls take the E5M2 gradient). TFLOP/s and the fp8 / bf16 speed-up.
2. A u-muP ``TransformerDecoder`` train step (u-muP Adam, bfloat16 compute, float32 master
   weights) at a size that fills one accelerator (default d_model 2048, 16 layers,
   8 x 1024 tokens per step): precision policy ``bf16`` against ``fp8`` (real float8 matmuls;
   attention core and norms in bfloat16) and ``fp8`` with u-muP's large-run overrides
   (attention-output and FFN-down projections kept in bf16). Tokens/s, model FLOPs utilisation
   and the loss after a short run on the same synthetic data from the same initialisation.
   Target (issue 6): fp8 >= 1.3x bf16 tokens/s at equal loss.

Model FLOPs per token = 6 x (parameters in matmuls, readout included, embedding table
excluded) + 12 x n_layers x d_model x seq_len (attention scores and values, Chowdhery et al.
2022, appendix B). MFU divides by the device's dense bf16 peak (``mfu_bf16_peak``); for the
fp8 runs ``mfu_fp8_peak`` divides by the dense fp8 peak as well.

The data are synthetic (no dataset packages needed): sequences from a fixed random sparse
Markov chain over the vocabulary (each token has 4 possible successors), so the loss falls
from ln(vocab) towards the chain's entropy rate and "equal loss" is a meaningful check.

This file imports only ``unitscale_jax.nn``, ``.optim`` and ``.precision`` (not ``.data`` or
``.train``), so it runs where only jax, flax, optax and chex are installed::

    PYTHONPATH=. python3 benchmarks/fp8_matmul.py            # GPU sizes
    PYTHONPATH=. python3 benchmarks/fp8_matmul.py --tiny     # a CPU check of the code path

Results: ``benchmarks/results/fp8_matmul.json`` and ``fp8_train_step.json`` (``--tiny``
writes ``*_tiny.json``), each naming the device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"

# Dense (no sparsity) peak TFLOP/s per device from NVIDIA's datasheets; first match of the
# device_kind substring wins. None: unknown, MFU not reported.
PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp8": 1513.0}),
    ("H100 NVL", {"bf16": 835.0, "fp8": 1671.0}),
    ("H100", {"bf16": 989.4, "fp8": 1978.9}),
    ("H200", {"bf16": 989.4, "fp8": 1978.9}),
    ("H20", {"bf16": 148.0, "fp8": 296.0}),
    ("GH200", {"bf16": 989.4, "fp8": 1978.9}),
    ("B200", {"bf16": 2250.0, "fp8": 4500.0}),
    ("L40S", {"bf16": 362.0, "fp8": 733.0}),
    ("L4", {"bf16": 121.0, "fp8": 242.5}),
    ("A100", {"bf16": 312.0, "fp8": None}),
)

SIZES = {
    "gpu": dict(matmuls=((4096, 4096, 4096), (8192, 8192, 8192), (8192, 2048, 8192),
                         (8192, 8192, 2048)),
                d_model=2048, n_layers=16, n_heads=16, vocab=8192, seq_len=1024, batch=8,
                steps=100, timed_steps=20, lr=2.0 ** -1, iters=50),
    "tiny": dict(matmuls=((128, 256, 64),), d_model=64, n_layers=2, n_heads=4, vocab=512,
                 seq_len=64, batch=4, steps=12, timed_steps=4, lr=2.0 ** -1, iters=3),
}


def device_info() -> dict:
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    peak = next((p for name, p in PEAK_TFLOPS if name.lower() in kind.lower()), None)
    return {"device_kind": kind, "platform": dev.platform, "device_count": jax.device_count(),
            "jax": jax.__version__, "python": platform.python_version(),
            "host": platform.node(), "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"), "peak_tflops": peak}


def timed(fn, *args, iters: int, warmup: int = 2) -> float:
    """Median seconds per call of a jitted ``fn(*args)`` (calls pipelined in groups)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    per_call = []
    group = max(1, iters // 5)
    for _ in range(5):
        t0 = time.perf_counter()
        out = None
        for _ in range(group):
            out = fn(*args)
        jax.block_until_ready(out)
        per_call.append((time.perf_counter() - t0) / group)
    return statistics.median(per_call)


# --------------------------------------------------------------------------- matmuls

def bench_matmuls(shapes, iters: int) -> list[dict]:
    from unitscale_jax.precision import fp8_dot

    rows = []
    for m, k, n in shapes:
        kx, kw, kg = jax.random.split(jax.random.key(0), 3)
        x = jax.random.normal(kx, (m, k), jnp.bfloat16)   # unit scale, as unit scaling keeps it
        w = jax.random.normal(kw, (k, n), jnp.bfloat16)
        g = jax.random.normal(kg, (m, n), jnp.bfloat16)
        x8, w8 = x.astype(jnp.float8_e4m3fn), w.astype(jnp.float8_e4m3fn)

        def bf16(a, b):
            return jnp.dot(a, b, preferred_element_type=jnp.bfloat16)

        def fp8(a, b):
            return fp8_dot(a, b, preferred_element_type=jnp.bfloat16)

        def fp8_bare(a8, b8):
            return jax.lax.dot_general(a8, b8, (((1,), (0,)), ((), ())),
                                       preferred_element_type=jnp.bfloat16)

        def fwd_bwd(f):
            def run(a, b, ct):
                y, vjp = jax.vjp(f, a, b)
                return y, vjp(ct)
            return jax.jit(run)

        flops = 2.0 * m * k * n
        t = {"bf16": timed(jax.jit(bf16), x, w, iters=iters),
             "fp8": timed(jax.jit(fp8), x, w, iters=iters),
             "fp8_bare": timed(jax.jit(fp8_bare), x8, w8, iters=iters),
             "bf16_fwd_bwd": timed(fwd_bwd(bf16), x, w, g, iters=iters),
             "fp8_fwd_bwd": timed(fwd_bwd(fp8), x, w, g, iters=iters)}
        ref = jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
        rel = lambda y: float(jnp.linalg.norm(y.astype(jnp.float32) - ref)  # noqa: E731
                              / jnp.linalg.norm(ref))
        row = {"m": m, "k": k, "n": n,
               **{f"{name}_ms": 1e3 * s for name, s in t.items()},
               **{f"{name}_tflops": (3 if "bwd" in name else 1) * flops / s / 1e12
                  for name, s in t.items()},
               "speedup_fwd": t["bf16"] / t["fp8"],
               "speedup_fwd_bare": t["bf16"] / t["fp8_bare"],
               "speedup_fwd_bwd": t["bf16_fwd_bwd"] / t["fp8_fwd_bwd"],
               "rel_error_bf16": rel(jax.jit(bf16)(x, w)),
               "rel_error_fp8": rel(jax.jit(fp8)(x, w))}
        rows.append(row)
        print(f"  {m}x{k}x{n}: bf16 {row['bf16_tflops']:.1f} TFLOP/s, fp8 {row['fp8_tflops']:.1f} "
              f"(bare GEMM {row['fp8_bare_tflops']:.1f}), speed-up fwd {row['speedup_fwd']:.2f}x, "
              f"fwd+bwd {row['speedup_fwd_bwd']:.2f}x; rel. error bf16 "
              f"{row['rel_error_bf16']:.1e}, fp8 {row['rel_error_fp8']:.1e}", flush=True)
    return rows


# --------------------------------------------------------------------------- train step

def markov_batches(vocab: int, batch: int, seq_len: int, n_batches: int, seed: int = 0,
                   fanout: int = 4) -> np.ndarray:
    """``[n_batches, batch, seq_len]`` int32 sequences of a fixed random sparse Markov chain."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, (vocab, fanout))
    probs = rng.dirichlet(np.ones(fanout), vocab).cumsum(1)
    rows = n_batches * batch
    out = np.empty((rows, seq_len), np.int32)
    out[:, 0] = rng.integers(0, vocab, rows)
    for t in range(1, seq_len):
        u = rng.random(rows)[:, None]
        choice = np.minimum((u > probs[out[:, t - 1]]).sum(1), fanout - 1)
        out[:, t] = succ[out[:, t - 1], choice]
    return out.reshape(n_batches, batch, seq_len)


def model_flops_per_token(params, c) -> float:
    """6 x matmul parameters + 12 x layers x d_model x seq_len (see the module docstring)."""
    from flax import nnx
    matmul_params = 0
    for path, v in nnx.to_flat_state(params):
        name = "/".join(map(str, path))
        if v.get_value().ndim >= 2 and "embed" not in name:
            matmul_params += int(np.prod(v.get_value().shape))
    return 6.0 * matmul_params + 12.0 * c.n_layers * c.d_model * c.max_seq_len


def bench_train_step(size: dict, policy_name: str, batches: np.ndarray, peak) -> dict:
    import optax
    from flax import nnx

    from unitscale_jax import nn, optim
    from unitscale_jax.precision import UMUP_LARGE_RUN_OVERRIDES, get_policy

    if policy_name == "fp8-overrides":
        policy = get_policy("fp8", overrides=UMUP_LARGE_RUN_OVERRIDES)
    else:
        policy = get_policy(policy_name)
    cfg = nn.TransformerConfig(
        vocab_size=size["vocab"], d_model=size["d_model"], n_layers=size["n_layers"],
        n_heads=size["n_heads"], max_seq_len=size["seq_len"], dtype="bfloat16",
        precision=policy, parametrization="umup", scan_layers=True)
    model = nnx.eval_shape(lambda: nn.TransformerDecoder(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model, nnx.Param)
    info = nn.param_info(model)
    steps = size["steps"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, size["lr"], max(steps // 10, 1), steps,
                                                  size["lr"] * 0.1)
    tx = optim.adam(schedule, param_info=info, peak_learning_rate=size["lr"])
    flops_per_token = model_flops_per_token(abstract, cfg)

    @jax.jit
    def init():
        params = nnx.state(nn.TransformerDecoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)
        return params, tx.init(params)

    def loss_fn(params, ids):
        return nnx.merge(graphdef, params).loss(ids)

    @jax.jit
    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(loss_fn)(params, ids)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    params, opt_state = init()
    data = jnp.asarray(batches)
    compiled = step.lower(params, opt_state, data[0]).compile()
    compile_s = time.perf_counter() - t0
    losses, times = [], []
    for i in range(steps):
        t1 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, data[i % len(batches)])
        loss = float(loss)  # synchronises: per-step wall time
        times.append(time.perf_counter() - t1)
        losses.append(loss)
        if not math.isfinite(loss):
            break
    timed_s = times[-size["timed_steps"]:]
    step_s = statistics.median(timed_s)
    tokens = size["batch"] * size["seq_len"]
    tps = tokens / step_s
    achieved = flops_per_token * tps / 1e12
    tail = losses[-max(1, steps // 10):]
    row = {"policy": policy_name, "step_s": step_s, "tokens_per_s": tps,
           "model_tflops_per_s": achieved, "flops_per_token": flops_per_token,
           "mfu_bf16_peak": achieved / peak["bf16"] if peak else None,
           "mfu_fp8_peak": (achieved / peak["fp8"] if peak and peak.get("fp8")
                            and policy_name != "bf16" else None),
           "compile_s": compile_s, "first_loss": losses[0], "final_loss": statistics.fmean(tail),
           "losses": losses, "finite": all(math.isfinite(v) for v in losses),
           "n_params": int(sum(np.prod(v.shape) for v in jax.tree.leaves(abstract)))}
    print(f"  {policy_name}: {tps:,.0f} tokens/s, {achieved:.3g} model TFLOP/s"
          + (f", MFU {100 * row['mfu_bf16_peak']:.1f}% of bf16 peak" if peak else "")
          + f"; loss {row['first_loss']:.3f} -> {row['final_loss']:.3f}", flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny sizes: check the path on CPU")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--skip-matmuls", action="store_true")
    ap.add_argument("--skip-train", action="store_true")
    for k in ("d_model", "n_layers", "n_heads", "vocab", "seq_len", "batch", "steps"):
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=None)
    args = ap.parse_args(argv)
    size = dict(SIZES["tiny" if args.tiny else "gpu"])
    for k in ("d_model", "n_layers", "n_heads", "vocab", "seq_len", "batch", "steps"):
        if getattr(args, k) is not None:
            size[k] = getattr(args, k)
    size["timed_steps"] = min(size["timed_steps"], max(1, size["steps"] - 2))
    info = device_info()
    suffix = "_tiny" if args.tiny else ""
    print(f"device: {info['device_kind']} ({info['platform']}), jax {info['jax']}", flush=True)
    if info["platform"] != "gpu" and not args.tiny:
        print("  note: no GPU; float8 matmuls are emulated here, so the figures say nothing "
              "about FP8 hardware (use --tiny for a quick check)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.skip_matmuls:
        print("matmuls:", flush=True)
        rows = bench_matmuls(size["matmuls"], size["iters"])
        path = args.out / f"fp8_matmul{suffix}.json"
        path.write_text(json.dumps({"device": info, "matmuls": rows}, indent=2) + "\n")
        print(f"wrote {path}")
    if not args.skip_train:
        print(f"train step: u-muP decoder d_model {size['d_model']}, {size['n_layers']} layers, "
              f"vocab {size['vocab']}, {size['batch']}x{size['seq_len']} tokens/step, "
              f"{size['steps']} steps", flush=True)
        batches = markov_batches(size["vocab"], size["batch"], size["seq_len"],
                                 n_batches=min(size["steps"], 64))
        runs = [bench_train_step(size, p, batches, info["peak_tflops"])
                for p in ("bf16", "fp8", "fp8-overrides")]
        base = runs[0]
        for r in runs[1:]:
            r["speedup_vs_bf16"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["loss_rel_diff_vs_bf16"] = r["final_loss"] / base["final_loss"] - 1
            r["target_met"] = bool(r["speedup_vs_bf16"] >= 1.3
                                   and abs(r["loss_rel_diff_vs_bf16"]) <= 0.01)
            print(f"  {r['policy']} / bf16: {r['speedup_vs_bf16']:.2f}x tokens/s, final loss "
                  f"{100 * r['loss_rel_diff_vs_bf16']:+.2f}% (target >= 1.3x at equal loss: "
                  f"{'met' if r['target_met'] else 'not met'})", flush=True)
        path = args.out / f"fp8_train_step{suffix}.json"
        path.write_text(json.dumps({"device": info, "size": {k: v for k, v in size.items()
                                                              if k != "matmuls"},
                                    "runs": runs}, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
