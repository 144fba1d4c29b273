"""Low precision without loss scaling: u-muP against the standard parametrization (SP).

A byte-level decoder trained on tiny Shakespeare in {u-muP, SP} x {fp32, bf16, fp16,
fp8-sim} with no loss scaling, plus SP in fp16 and fp8-sim with a static loss scale, over a
few seeds, through the trainer's Python API (``unitscale_jax.train.run``; ``--precision`` and
``--loss-scale`` are described in ``unitscale_jax.train.precision``). The claim under test
(Blake et al., "Unit Scaling", ICML 2023; u-muP, ICLR 2025): u-muP in fp16 / fp8 matches fp32
with no loss scaling, while SP's small gradients underflow unless the loss is scaled.

Besides the final losses it measures, with ``unitscale_jax.analysis.forward_backward`` (the
taps on every op output and its gradient) on a float32 copy of each model, the fraction of
values of each tensor class -- activations, weights, activation gradients, weight gradients --
that would underflow (flush to zero), fall in the subnormal range, or saturate in FP16, E4M3
and E5M2, at initialisation and at the end of training. SP's gradient fractions are also
given at larger batches (tokens per step), since SP's gradients scale as 1 / tokens.

Outputs (``--out``, default ``experiments/results``):

- ``low_precision.csv``: one row per run (final validation loss, bits per byte, diverged
  flag, skipped steps, and the fractions of its final-state tensors that underflow or
  saturate in fp16 / E4M3 / E5M2, gradients multiplied by the run's loss scale);
- ``low_precision.png``: loss curves (mean over seeds);
- ``low_precision_underflow.csv``: fractions per parametrization, tensor class and format,
  at init and at the end (the fp32 run of seed 0), and SP's at init against tokens per step;
- ``low_precision_lr_sweep.csv`` (``--lr-sweep``): the learning-rate check in fp32.

Usage (from the repository root)::

    python experiments/low_precision.py                # full: ~15-20 min on 2 CPU cores
    python experiments/low_precision.py --quick        # smoke run: ~2 min
    python experiments/low_precision.py --lr-sweep     # the fp32 learning-rate check
    python experiments/low_precision.py --large-batch  # fp32 vs fp16 at 16k tokens/step (~15 min)
"""

from __future__ import annotations

import argparse
import csv
import math
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"

# Sizes: the full one trains a run in ~40 s on a shared 2-core CPU.
SIZES = {
    "full": dict(d_model=64, n_layers=2, n_heads=4, seq_len=64, batch_size=16, steps=400,
                 eval_every=50, eval_batches=16, log_every=5, seeds=(0, 1)),
    "quick": dict(d_model=32, n_layers=1, n_heads=2, seq_len=32, batch_size=8, steps=40,
                  eval_every=20, eval_batches=4, log_every=5, seeds=(0,)),
    # --large-batch: the same model at 16k tokens per step, where SP's mean-loss gradients
    # are 16x smaller and a sizeable fraction of them falls below fp16's range
    "large": dict(d_model=64, n_layers=2, n_heads=4, seq_len=64, batch_size=256, steps=200,
                  eval_every=50, eval_batches=8, log_every=5, seeds=(0,)),
}
# Peak learning rates (AdamW, warmup + cosine): the best of the fp32 check (--lr-sweep, full
# size, seed 0, results in low_precision_lr_sweep.csv). At this size and length u-muP's
# optimum is flat over 2^-2..2^-1 (2^0 is 1% worse); SP's is 2^-8.
LRS = {"umup": 2.0 ** -2, "sp": 2.0 ** -8}
SWEEP_LRS = {"umup": tuple(2.0 ** k for k in range(-3, 2)),
             "sp": tuple(2.0 ** -k for k in range(4, 11))}
PRECISIONS = ("fp32", "bf16", "fp16", "fp8-sim")
LOSS_SCALE = 2.0 ** 10
FULL_RUNS = ([(p, prec, None) for p in ("umup", "sp") for prec in PRECISIONS]
             + [("sp", "fp16", LOSS_SCALE), ("sp", "fp8-sim", LOSS_SCALE)])
QUICK_RUNS = [("umup", "fp32", None), ("umup", "fp8-sim", None), ("sp", "fp32", None),
              ("sp", "fp8-sim", None), ("sp", "fp8-sim", LOSS_SCALE)]
LARGE_RUNS = [("umup", "fp32", None), ("umup", "fp16", None), ("sp", "fp32", None),
              ("sp", "fp16", None), ("sp", "fp16", LOSS_SCALE)]
TOKENS_SWEEP = {"full": (16, 64, 256, 1024), "quick": (8, 64), "large": ()}  # SP, init
STEMS = {"full": "low_precision", "quick": "low_precision", "large": "low_precision_large_batch"}

CLASSES = ("activations", "weights", "activation_grads", "weight_grads")
FORMAT_NAMES = ("fp16", "e4m3", "e5m2")
# Per-run columns: tensor class, format, statistic.
RUN_FRACTIONS = [("activations", "fp16", "underflow"), ("activations", "fp16", "saturation"),
                 ("activations", "e4m3", "underflow"), ("activations", "e4m3", "saturation"),
                 ("weights", "fp16", "underflow"), ("weights", "e4m3", "underflow"),
                 ("weights", "e4m3", "saturation"),
                 ("activation_grads", "fp16", "underflow"),
                 ("activation_grads", "fp16", "saturation"),
                 ("activation_grads", "e5m2", "underflow"),
                 ("activation_grads", "e5m2", "saturation"),
                 ("weight_grads", "fp16", "underflow")]
SHORT = {"activations": "act", "weights": "w", "activation_grads": "grad",
         "weight_grads": "wgrad"}


def _col(cls: str, fmt: str, stat: str) -> str:
    return f"{SHORT[cls]}_{fmt}_{stat}"


# --------------------------------------------------------------------------- training

def make_config(par: str, prec: str, loss_scale: Optional[float], seed: int, size: dict,
                lr: float, data: str, run_dir: Path):
    from unitscale_jax import train
    return train.get_preset("tiny").replace(
        model={"parametrization": par, "d_model": size["d_model"], "n_layers": size["n_layers"],
               "n_heads": size["n_heads"]},
        data={"data": data, "seq_len": size["seq_len"]},
        optimizer={"lr": lr},
        training={"steps": size["steps"], "batch_size": size["batch_size"],
                  "eval_every": size["eval_every"], "eval_batches": size["eval_batches"],
                  "log_every": size["log_every"], "seed": seed, "precision": prec,
                  "loss_scale": loss_scale, "run_dir": str(run_dir), "overwrite": True,
                  "progress": False, "tensorboard": False, "plot": False, "checkpoint": True,
                  "checkpoint_every": 0, "keep_checkpoints": 1,
                  "async_checkpointing": False})


def run_name(par: str, prec: str, loss_scale: Optional[float], seed: int,
             lr: Optional[float] = None) -> str:
    ls = "" if loss_scale is None else f"-ls{int(math.log2(loss_scale))}"
    lr_ = "" if lr is None else f"-lr{math.log2(lr):+g}"
    return f"{par}-{prec}{ls}{lr_}-s{seed}"


def train_one(cfg) -> dict:
    """Runs ``cfg``; a run stopped for non-finite values is a diverged run, not an error."""
    from unitscale_jax import train
    t0 = time.perf_counter()
    message = ""
    try:
        s = train.run(cfg, quiet=True)
        val, bpb, skipped = s["final_val_loss"], s["final_bits_per_byte"], s["skipped_steps"]
    except train.TrainingStopped as e:
        val = bpb = float("nan")
        skipped, message = None, str(e)
    rows = train.read_metrics(Path(cfg.training.run_dir) / "metrics.jsonl")
    train_rows = [r for r in rows if r["split"] == "train"]
    if skipped is None:
        skipped = max((r.get("skipped_steps", 0) for r in train_rows), default=0)
    return {"final_val_loss": val, "bits_per_byte": bpb,
            "final_train_loss": train_rows[-1]["loss"] if train_rows else float("nan"),
            "diverged": not math.isfinite(val), "skipped_steps": skipped,
            "seconds": time.perf_counter() - t0, "message": message, "metrics": rows}


# --------------------------------------------------------------------------- fractions

def text_batch(data: str, batch_size: int, seq_len: int, *, offset_fraction: float = 0.97
               ) -> dict:
    """A fixed batch of byte tokens from the held-out end of the text (byte tokenizer: ids
    are byte values)."""
    import jax.numpy as jnp
    import numpy as np
    raw = np.frombuffer(Path(data).read_bytes(), np.uint8).astype(np.int32)
    need = batch_size * (seq_len + 1)
    start = min(int(len(raw) * offset_fraction), len(raw) - need)
    if start < 0:
        raise SystemExit(f"{data} holds {len(raw)} bytes, fewer than one batch ({need}).")
    ids = jnp.asarray(raw[start:start + need].reshape(batch_size, seq_len + 1))
    return {"inputs": ids[:, :-1], "targets": ids[:, 1:],
            "where": jnp.ones((batch_size, seq_len), bool)}


class Fractions:
    """Underflow / subnormal / saturation fractions of each tensor class of one forward and
    backward pass of a float32 copy of a model (one compilation per parametrization and
    batch shape; the gradients are multiplied by a traced loss scale)."""

    def __init__(self):
        self._fns: dict = {}

    def _fn(self):
        if self._fns:
            return self._fns["fn"]
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from unitscale_jax import analysis
        from unitscale_jax.precision import E4M3, E5M2, FP16, format_stats
        from unitscale_jax.train import build

        task = build.get_task("decoder")

        def loss_fn(model, batch):
            return task.loss(model, batch, None)[0]

        def fractions(graphdef, state, batch, grad_scale):
            model = nnx.merge(graphdef, state)
            loss, acts, g_acts, params, g_params = analysis.forward_backward(model, batch, loss_fn)
            leaves = lambda tree: [v for v in jax.tree.leaves(tree)  # noqa: E731
                                   if jnp.issubdtype(v.dtype, jnp.floating)]
            tensors = {"activations": list(acts.values()), "weights": leaves(params),
                       "activation_grads": [g * grad_scale for g in g_acts.values()],
                       "weight_grads": [g * grad_scale for g in leaves(g_params)]}
            out = {}
            for cls, ts in tensors.items():
                flat = jnp.concatenate([t.astype(jnp.float32).ravel() for t in ts])
                for name, fmt in zip(FORMAT_NAMES, (FP16, E4M3, E5M2)):
                    stats = format_stats(flat, fmt)  # fractions of all the class's values
                    for stat in ("underflow", "subnormal", "saturation"):
                        out[(cls, name, stat)] = getattr(stats, stat)
            return loss, out

        # the graph definition is static: one compilation per model structure and batch shape
        self._fns["fn"] = jax.jit(fractions, static_argnums=0)
        return self._fns["fn"]

    def of_params(self, cfg, vocab: int, params, batch, grad_scale: float = 1.0) -> dict:
        """Fractions for ``params`` (an ``nnx.State`` of the run's scanned model)."""
        import jax
        import jax.numpy as jnp
        import numpy as np
        from flax import nnx

        from unitscale_jax import analysis, train
        cfg32 = train.resolve(cfg.replace(training={"precision": "fp32", "loss_scale": None}))
        model = nnx.eval_shape(lambda: train.build_model(cfg32, vocab))
        # host arrays: the same jit cache entry whatever device placement params came with
        nnx.update(model, jax.tree.map(lambda a: np.asarray(a, np.float32),
                                       jax.device_get(params)))
        graphdef, state = nnx.split(analysis.unroll(model))
        loss, out = self._fn()(graphdef, state, batch, jnp.float32(grad_scale))
        return {k: float(v) for k, v in jax.device_get(out).items()}

    def at_init(self, cfg, vocab: int, batch, grad_scale: float = 1.0) -> dict:
        import jax
        from flax import nnx

        from unitscale_jax import train
        cfg = train.resolve(cfg)
        params = jax.jit(lambda: nnx.state(train.build_model(cfg, vocab), nnx.Param))()
        return self.of_params(cfg, vocab, params, batch, grad_scale)

    def at_end(self, run_dir: Path, vocab: int, batch, grad_scale: float = 1.0) -> dict:
        from flax import nnx

        from unitscale_jax import train
        cfg, _, model, _ = train.load_run(run_dir, log=lambda *a, **k: None)
        return self.of_params(cfg, vocab, nnx.state(model, nnx.Param), batch, grad_scale)


# --------------------------------------------------------------------------- outputs

def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(r.get(k)) for k in fields})


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


def _ls_label(ls: Optional[float]) -> str:
    return "none" if ls is None else f"2^{int(math.log2(ls))}"


def groups(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        out.setdefault((r["parametrization"], r["precision"], r["loss_scale"]), []).append(r)
    return out


def summary_table(results: list[dict]) -> str:
    """Markdown table: mean final validation loss over seeds and the change against the
    same parametrization's fp32 runs."""
    g = groups(results)
    base = {}
    for (par, prec, ls), rs in g.items():
        if prec == "fp32" and ls is None:
            base[par] = statistics.fmean(r["final_val_loss"] for r in rs)
    lines = ["| parametrization | precision | loss scale | val loss (mean ± sd over seeds) | "
             "bits/byte | vs fp32 | diverged | skipped steps |",
             "|---|---|---|---|---|---|---|---|"]
    for (par, prec, ls), rs in g.items():
        vals = [r["final_val_loss"] for r in rs]
        finite = [v for v in vals if math.isfinite(v)]
        mean = statistics.fmean(finite) if finite else float("nan")
        sd = statistics.stdev(finite) if len(finite) > 1 else 0.0
        bpb = statistics.fmean([r["bits_per_byte"] for r in rs if math.isfinite(r["bits_per_byte"])]
                               or [float("nan")])
        rel = (mean / base[par] - 1) * 100 if par in base and math.isfinite(mean) else float("nan")
        name = "u-μP" if par == "umup" else "SP"
        lines.append(f"| {name} | {prec} | {_ls_label(ls)} | {mean:.4f} ± {sd:.4f} | {bpb:.3f} | "
                     f"{rel:+.2f}% | {sum(r['diverged'] for r in rs)}/{len(rs)} | "
                     f"{max(r['skipped_steps'] or 0 for r in rs)} |")
    return "\n".join(lines)


def underflow_table(rows: list[dict]) -> str:
    """Markdown table of the init / end fractions (batch of the experiment)."""
    lines = ["| model | when | tensor class | fp16 underflow | fp16 subnormal | e4m3 underflow | "
             "e4m3 saturation | e5m2 underflow | e5m2 saturation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("tokens_per_step") != r.get("experiment_tokens"):
            continue
        lines.append(f"| {r['model']} | {r['when']} | {r['tensor_class']} | "
                     + " | ".join(f"{100 * r[k]:.2f}%" for k in (
                         "fp16_underflow", "fp16_subnormal", "e4m3_underflow",
                         "e4m3_saturation", "e5m2_underflow", "e5m2_saturation")) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path, size: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    colors = {"fp32": "k", "bf16": "tab:blue", "fp16": "tab:orange", "fp8-sim": "tab:red"}
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for col, par in enumerate(("umup", "sp")):
        for (p, prec, ls), rs in groups(results).items():
            if p != par:
                continue
            label = prec + ("" if ls is None else f", loss scale {_ls_label(ls)}")
            style = dict(color=colors[prec], ls="--" if ls else "-", lw=1.3)
            for row, split in enumerate(("train", "validation")):
                curves = []
                for r in rs:
                    pts = [(m["step"], m["loss"]) for m in r["metrics"] if m["split"] == split]
                    curves.append(dict(pts))
                steps = sorted(set.intersection(*(set(c) for c in curves)))
                if not steps:
                    continue
                y = np.array([[c[s] for s in steps] for c in curves]).mean(0)
                if split == "train" and len(y) > 8:  # moving average over 5 logged points
                    k = 5
                    y = np.convolve(y, np.ones(k) / k, mode="valid")
                    steps = steps[k - 1:]
                axes[row, col].plot(steps, y, label=label, **style)
        name = "u-μP" if par == "umup" else "SP"
        axes[0, col].set_title(f"{name} (lr 2^{math.log2(LRS[par]):g})")
        axes[1, col].set_xlabel("step")
        for row, what in enumerate(("train loss (smoothed)", "validation loss")):
            ax = axes[row, col]
            ax.set_ylabel(what + " [nats/byte]")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    lo = min((m["loss"] for r in results for m in r["metrics"]
              if m["split"] == "validation" and math.isfinite(m["loss"])), default=1.0)
    for ax in axes.flat:
        ax.set_ylim(lo - 0.1, lo + 1.6)
    fig.suptitle(f"byte-level decoder on tiny Shakespeare, d_model {size['d_model']}, "
                 f"{size['n_layers']} layers, {size['batch_size']}x{size['seq_len']} tokens/step, "
                 f"mean of {len(size['seeds'])} seed(s), no loss scaling unless marked")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main

def lr_sweep(args, size: dict, data: str, runs: Path) -> None:
    rows = []
    for par, lrs in SWEEP_LRS.items():
        for lr in lrs:
            name = run_name(par, "fp32", None, 0, lr)
            r = train_one(make_config(par, "fp32", None, 0, size, lr, data, runs / name))
            rows.append({"parametrization": par, "lr": lr, "log2_lr": math.log2(lr), **r})
            print(f"{name}: val {r['final_val_loss']:.4f} ({r['seconds']:.0f} s)", flush=True)
    path = args.out / "low_precision_lr_sweep.csv"
    write_csv(path, rows, ["parametrization", "log2_lr", "lr", "final_val_loss",
                           "bits_per_byte", "final_train_loss", "diverged"])
    for par in SWEEP_LRS:
        ok = [r for r in rows if r["parametrization"] == par and not r["diverged"]]
        best = min(ok, key=lambda r: r["final_val_loss"]) if ok else None
        print(f"{par}: best lr 2^{best['log2_lr']:g}" if best else f"{par}: every lr diverged")
    print(f"wrote {path}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run (a couple of minutes)")
    ap.add_argument("--lr-sweep", action="store_true", help="only the fp32 learning-rate check")
    ap.add_argument("--large-batch", action="store_true",
                    help="fp32 against fp16 (SP also with a loss scale) at 16k tokens per step, "
                         "one seed; writes low_precision_large_batch*.csv/png")
    ap.add_argument("--data", default=str(DEFAULT_DATA),
                    help="text file (default tiny Shakespeare)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    ap.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "low_precision",
                    help="run directories (checkpoints, metrics)")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default: mode's)")
    ap.add_argument("--keep-runs", action="store_true", help="keep the run directories")
    args = ap.parse_args(argv)
    if not Path(args.data).is_file():
        raise SystemExit(f"data file {args.data} not found; pass --data PATH to a text file.")
    mode = "quick" if args.quick else "large" if args.large_batch else "full"
    stem = STEMS[mode]
    size = dict(SIZES[mode])
    if args.seeds:
        size["seeds"] = tuple(range(args.seeds))
    runs = args.runs_dir / mode
    t_start = time.perf_counter()
    if args.lr_sweep:
        lr_sweep(args, size, args.data, runs)
        return 0

    vocab = 260  # the byte tokenizer: 256 bytes and 4 special tokens
    batch = text_batch(args.data, size["batch_size"], size["seq_len"])
    fr = Fractions()
    results = []
    plan = {"quick": QUICK_RUNS, "full": FULL_RUNS, "large": LARGE_RUNS}[mode]
    for seed in size["seeds"]:
        for par, prec, ls in plan:
            name = run_name(par, prec, ls, seed)
            cfg = make_config(par, prec, ls, seed, size, LRS[par], args.data, runs / name)
            r = train_one(cfg)
            row = {"parametrization": par, "precision": prec, "loss_scale": ls,
                   "loss_scale_label": _ls_label(ls), "seed": seed, "lr": LRS[par], **r}
            if not r["diverged"]:
                end = fr.at_end(runs / name, vocab, batch, ls or 1.0)
                row.update({_col(*k): end[k] for k in RUN_FRACTIONS})
            results.append(row)
            print(f"{name}: val {r['final_val_loss']:.4f}, {r['bits_per_byte']:.4f} bits/byte"
                  + (f", {r['skipped_steps']} skipped steps" if ls else "")
                  + (" DIVERGED" if r["diverged"] else "") + f" ({r['seconds']:.0f} s)",
                  flush=True)

    # fractions per tensor class at init and at the end (fp32 runs, seed 0)
    seed0 = size["seeds"][0]
    tokens = size["batch_size"] * size["seq_len"]
    urows = []

    def add(model, when, fracs, batch_size):
        for cls in CLASSES:
            r = {"model": model, "when": when, "tensor_class": cls,
                 "tokens_per_step": batch_size * size["seq_len"], "experiment_tokens": tokens}
            for fmt in FORMAT_NAMES:
                for stat in ("underflow", "subnormal", "saturation"):
                    r[f"{fmt}_{stat}"] = fracs[(cls, fmt, stat)]
            urows.append(r)

    for par in ("umup", "sp"):
        name = run_name(par, "fp32", None, seed0)
        cfg = make_config(par, "fp32", None, seed0, size, LRS[par], args.data, runs / name)
        label = "u-muP" if par == "umup" else "SP"
        add(label, "init", fr.at_init(cfg, vocab, batch), size["batch_size"])
        add(label, "end", fr.at_end(runs / name, vocab, batch), size["batch_size"])
        if par == "sp":
            ls_label = f"SP x loss scale {_ls_label(LOSS_SCALE)}"
            add(ls_label, "init", fr.at_init(cfg, vocab, batch, LOSS_SCALE), size["batch_size"])
            add(ls_label, "end", fr.at_end(runs / name, vocab, batch, LOSS_SCALE),
                size["batch_size"])
            for b in TOKENS_SWEEP[mode]:
                if b != size["batch_size"]:
                    big = text_batch(args.data, b, size["seq_len"], offset_fraction=0.5)
                    add(label, "init", fr.at_init(cfg, vocab, big), b)

    fields = (["parametrization", "precision", "loss_scale_label", "seed", "lr",
               "final_val_loss", "bits_per_byte", "final_train_loss", "diverged",
               "skipped_steps"] + [_col(*k) for k in RUN_FRACTIONS] + ["seconds", "message"])
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(args.out / f"{stem}.csv", results, fields)
    ufields = (["model", "when", "tensor_class", "tokens_per_step"]
               + [f"{f}_{s}" for f in FORMAT_NAMES for s in ("underflow", "subnormal",
                                                               "saturation")])
    write_csv(args.out / f"{stem}_underflow.csv", urows, ufields)
    plot(results, args.out / f"{stem}.png", size)
    print()
    print(f"{mode} mode: d_model {size['d_model']}, {size['n_layers']} layers, "
          f"{size['batch_size']}x{size['seq_len']} tokens/step, {size['steps']} steps, "
          f"seeds {list(size['seeds'])}, lr u-muP 2^{math.log2(LRS['umup']):g} / SP "
          f"2^{math.log2(LRS['sp']):g}")
    print(summary_table(results))
    print()
    print("fractions of values per tensor class (float32 model, the experiment's batch):")
    print(underflow_table(urows))
    print()
    sp_tokens = [r for r in urows if r["model"] == "SP" and r["when"] == "init"
                 and r["tensor_class"] == "activation_grads"]
    print("SP activation gradients at init vs tokens per step: "
          + ", ".join(f"{r['tokens_per_step']} tokens: fp16 underflow "
                      f"{100 * r['fp16_underflow']:.2f}% / subnormal "
                      f"{100 * r['fp16_subnormal']:.1f}%, e5m2 underflow "
                      f"{100 * r['e5m2_underflow']:.1f}%"
                      for r in sorted(sp_tokens, key=lambda r: r["tokens_per_step"])))
    print(f"wrote {args.out / (stem + '.csv')}, {args.out / (stem + '_underflow.csv')}, "
          f"{args.out / (stem + '.png')} in {time.perf_counter() - t_start:.0f} s")
    if not args.keep_runs:
        shutil.rmtree(runs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
