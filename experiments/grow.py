"""Progressive growth: grow a decoder deeper halfway through its budget vs train it from scratch.

For u-muP and SP: a ``--depth``-layer decoder trained for ``--grow-at`` of ``--steps``, grown
with ``unitscale-jax grow`` (``train.grow``: ``--factor`` times the layers, ``--mode``
duplicate or interleave) and trained for the rest of the steps with the **same learning rate**
(the grown run's config is the source's but for ``n_layers``; its optimizer state and schedule
start afresh); against it, the ``factor * depth``-layer decoder trained from scratch for all
``--steps`` on the same rows (same seed). Validation loss is plotted against training FLOPs
(``flops_per_token``: ``6 N + 6 L T d``, Kaplan et al., 2020, with ``N`` the parameters that
take part in matmuls: all but the embedding table), so the grown run's cheaper first half
shows. The loss right after growing (the grown run's validation loss at its step 0) is
reported next to the small model's last one: the residual taus depend on depth
(``ops.transformer_residual_scaling_rule``), so growth is not function-preserving.

Every run goes through the library's own commands (``train.run`` on parsed ``train`` flags,
``train.grow.grow_run``), each into its run directory under ``<out>/<tag>_work``; rerunning
resumes each run from its last checkpoint.

Outputs in ``--out`` (default ``experiments/results/``, ``.../quick/`` for ``--quick``):
``<tag>_curves.csv`` (validation loss per run and step, with cumulative FLOPs),
``<tag>_summary.csv`` (per parametrization: the final losses, the loss before and right after
growing, the FLOPs of each arm), ``<tag>.png`` (loss against FLOPs) and ``<tag>_meta.json``
(settings, command, machine, timings, the claims as computed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import _sweep
import numpy as np

QUICK = {"width": 32, "d_head": 16, "depth": 1, "steps": 20, "eval_every": 5,
         "batch_size": 8, "seq_len": 32}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (minutes on a 2-core "
                   "CPU); sizes from QUICK, writes grow_quick_* files under results/quick/")
    p.add_argument("--data", default=None, help="training text (default: the built-in corpus)")
    p.add_argument("--parametrizations", default="umup,sp")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--d-head", type=int, default=32)
    p.add_argument("--depth", type=int, default=2, help="layers before growing")
    p.add_argument("--factor", type=int, default=2, help="depth growth factor")
    p.add_argument("--mode", default="duplicate", choices=("duplicate", "interleave"))
    p.add_argument("--steps", type=int, default=2000, help="total steps of each arm")
    p.add_argument("--grow-at", type=float, default=0.5, help="share of --steps before growing")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    return p


def flops_per_token(run_dir: Path) -> float:
    """Training FLOPs per token of a run's model: ``6 N + 6 L T d`` (``N``: parameters of
    the matmuls, all but the embedding table; ``L T d``: attention over ``T`` positions)."""
    from flax import nnx

    from unitscale_jax import data as datalib
    from unitscale_jax.train import build, interop
    from unitscale_jax.train.config import resolve
    from unitscale_jax.train.run_dir import read_run_config
    cfg = resolve(read_run_config(run_dir))
    vocab_size = datalib.get_tokenizer(cfg.data.tokenizer).vocab_size
    model = nnx.eval_shape(lambda: build.build_model(cfg, vocab_size))
    sizes = interop.flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    n = sum(v.size for k, v in sizes.items() if not k.startswith("embed."))
    return 6.0 * n + 6.0 * cfg.model.n_layers * cfg.data.seq_len * cfg.model.d_model


def _flags(args, par: str, layers: int, steps: int, run_dir: Path) -> list[str]:
    data = ["--data", args.data] if args.data else []
    return ["--model", "decoder", "--parametrization", par, "--d-model", str(args.width),
            "--n-layers", str(layers), "--n-heads", str(args.width // args.d_head),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--seed", str(args.seed), "--steps", str(steps), "--eval-every",
            str(args.eval_every), "--keep-checkpoints", "1", "--no-progress",
            "--no-tensorboard", "--no-plot", "--run-dir", str(run_dir), *data]


def _curve(run_dir: Path, arm: str, par: str, flops0: float, step0: int, tokens: int
           ) -> list[dict]:
    from unitscale_jax.train.metrics import read_metrics
    f = flops_per_token(run_dir)
    return [{"parametrization": par, "arm": arm, "step": step0 + r["step"],
             "flops": flops0 + f * tokens * r["step"], "val_loss": r["loss"]}
            for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "validation"]


def run_arms(args, work: Path, par: str, log: Callable[[str], None]) -> list[dict]:
    """Trains the three runs of one parametrization; returns their validation curves."""
    from unitscale_jax.train import run as train_run
    from unitscale_jax.train.flags import parse_train_args
    from unitscale_jax.train.grow import grow_run
    first = max(1, int(round(args.steps * args.grow_at)))
    rest = args.steps - first
    if rest < 1:
        raise SystemExit(f"--grow-at {args.grow_at} leaves no steps after growing")
    tokens = args.batch_size * args.seq_len
    big, small, grown = (work / f"{name}_{par}" for name in ("scratch", "small", "grown"))
    train_run(parse_train_args(_flags(args, par, args.depth * args.factor, args.steps, big)),
              quiet=True)
    train_run(parse_train_args(_flags(args, par, args.depth, first, small)), quiet=True)
    if not (grown / "config.json").exists():
        grow_run(small, grown, args.factor, mode=args.mode, steps=rest, log=log)
    flags = ["--config", str(grown / "config.json"), "--no-progress"]
    train_run(parse_train_args(flags), quiet=True)
    curves = _curve(big, "scratch", par, 0.0, 0, tokens) + _curve(small, "small", par, 0.0, 0,
                                                                 tokens)
    small_flops = flops_per_token(small) * tokens * first
    return curves + _curve(grown, "grown", par, small_flops, first, tokens)


def summarise(curves: Sequence[dict], grow_step: int) -> tuple[list[dict], dict]:
    """Per parametrization: final loss and FLOPs of each arm, the loss before and right after
    growing; the claims."""
    summary, claims = [], {}
    for par in sorted({r["parametrization"] for r in curves}):
        by = {arm: sorted((r for r in curves if (r["parametrization"], r["arm"]) == (par, arm)),
                          key=lambda r: r["step"]) for arm in ("scratch", "small", "grown")}
        s = {"parametrization": par,
             "scratch_final_val_loss": by["scratch"][-1]["val_loss"],
             "scratch_flops": by["scratch"][-1]["flops"],
             "small_final_val_loss": by["small"][-1]["val_loss"],
             "grown_step0_val_loss": by["grown"][0]["val_loss"],
             "grown_final_val_loss": by["grown"][-1]["val_loss"],
             "grown_flops": by["grown"][-1]["flops"], "grow_step": grow_step}
        s["scratch_val_loss_at_grown_flops"] = float(np.interp(
            s["grown_flops"], [r["flops"] for r in by["scratch"]],
            [r["val_loss"] for r in by["scratch"]]))
        summary.append(s)
        claims[f"{par}_grown_at_most_scratch_loss"] = (
            s["grown_final_val_loss"] <= s["scratch_final_val_loss"])
        claims[f"{par}_grown_at_most_scratch_loss_at_equal_flops"] = (
            s["grown_final_val_loss"] <= s["scratch_val_loss_at_grown_flops"])
        claims[f"{par}_jump_at_growth"] = s["grown_step0_val_loss"] - s["small_final_val_loss"]
        claims[f"{par}_flops_saved_fraction"] = 1.0 - s["grown_flops"] / s["scratch_flops"]
    return summary, claims


def plot(curves: Sequence[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pars = [p for p in ("umup", "sp") if any(r["parametrization"] == p for r in curves)]
    fig, axes = plt.subplots(1, max(1, len(pars)), figsize=(5 * max(1, len(pars)), 3.6),
                             squeeze=False)
    for ax, par in zip(axes[0], pars):
        for arm, style in (("scratch", "s--"), ("small", "o:"), ("grown", "o-")):
            rs = sorted((r for r in curves if (r["parametrization"], r["arm"]) == (par, arm)),
                        key=lambda r: r["step"])
            ax.plot([r["flops"] for r in rs], [r["val_loss"] for r in rs], style, ms=3,
                    label={"scratch": "deep, from scratch", "small": "shallow",
                           "grown": "grown"}[arm])
        ax.set_title("u-μP" if par == "umup" else "SP")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _sweep.save_figure(fig, path, title, fontsize=9)


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    args = build_parser().parse_args(argv)
    mode = _sweep.apply_quick(args, argv, QUICK)
    pars = _sweep.parametrizations(args.parametrizations)
    if args.width % args.d_head:
        raise SystemExit(f"--width must be a multiple of --d-head {args.d_head}")
    tag = args.tag or ("grow" if mode == "full" else "grow_quick")
    out = _sweep.out_dir(args, mode)
    work = out / f"{tag}_work"
    work.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "tag", "quick")}
    meta = {"settings": {**settings, "mode": mode},
            "command": "python experiments/grow.py " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "machine": _sweep.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    log(f"grow ({mode}): width {args.width}, {args.depth} -> {args.depth * args.factor} layers "
        f"({args.mode}) at {args.grow_at:g} of {args.steps} steps, batch {args.batch_size} x "
        f"seq {args.seq_len}")
    curves = [row for par in pars for row in run_arms(args, work, par, log)]
    grow_step = max(1, int(round(args.steps * args.grow_at)))
    summary, claims = summarise(curves, grow_step)
    _sweep.write_csv(out / f"{tag}_curves.csv", curves)
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    png = plot(curves, out / f"{tag}.png",
               title=f"growth ({mode}): {args.depth} -> {args.depth * args.factor} layers "
               f"({args.mode}) at step {grow_step} of {args.steps}, width {args.width}, same lr")
    meta.update(claims=claims, summary=summary, wall_s=round(time.perf_counter() - t0, 1),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    meta_path = out / f"{tag}_meta.json"
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    for s in summary:
        log(f"{s['parametrization']:4s} scratch {s['scratch_final_val_loss']:.4f} "
            f"({s['scratch_flops']:.3g} FLOPs), grown {s['grown_final_val_loss']:.4f} "
            f"({s['grown_flops']:.3g} FLOPs); at growth {s['small_final_val_loss']:.4f} -> "
            f"{s['grown_step0_val_loss']:.4f}")
    return {"summary": summary, "claims": claims, "curves": curves, "png": str(png),
            "meta": str(meta_path)}


if __name__ == "__main__":
    main()
