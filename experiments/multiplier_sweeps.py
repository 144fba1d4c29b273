"""One-dimensional sweeps of the five u-muP multipliers at u-muP's best learning rate.

Each of ``attn_mult`` (alpha_attn-softmax), ``act_mult`` (alpha_ffn-act), ``residual_mult``
(alpha_res), ``residual_attn_ratio`` (alpha_res-attn-ratio) and ``loss_mult``
(alpha_loss-softmax) is swept over powers of 2 (default 2^-2..2^2) with the other four at 1,
on the u-muP byte-level decoder of ``lr_transfer.py`` (same width, depth, token budget,
schedule and Adam without weight decay) at the best learning rate ``lr_transfer.py`` found for
that width (``--lr-log2`` overrides). The baseline (every multiplier 1) is also trained with
extra seeds (initialisation and data order) to measure the run-to-run noise. The claim
tested: 1 is near-optimal for each multiplier. Outputs in ``--out``:
``multiplier_sweeps_runs.csv``, ``multiplier_sweeps_summary.csv`` (best value per multiplier,
the loss gap of 1 to it, the seed noise), ``multiplier_sweeps.png`` and ``_meta.json``.

    python experiments/multiplier_sweeps.py          # full (after lr_transfer.py)
    python experiments/multiplier_sweeps.py --quick  # a few minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _sweep  # noqa: E402

EXTEND_LIMIT = 6  # log2: extend a sweep up to 2^-6 .. 2^6
MULTIPLIERS = ("attn_mult", "act_mult", "residual_mult", "residual_attn_ratio", "loss_mult")
QUICK = {"width": 32, "depth": 2, "steps": 40, "batch_size": 8, "seq_len": 32,
         "eval_batches": 8, "values": "-1,1", "extra_seeds": 1, "no_extend": True}
SMOKE = {"width": 16, "depth": 1, "steps": 6, "batch_size": 4, "seq_len": 16,
         "eval_batches": 2, "values": "1", "extra_seeds": 0, "no_extend": True}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--d-head", type=int, default=8)
    p.add_argument("--values", default="-2:2", help="log2 multiplier values (a:b or "
                   "comma-separated; 0, i.e. 1, is always included)")
    p.add_argument("--multipliers", default=",".join(MULTIPLIERS))
    p.add_argument("--lr-log2", type=float, default=None, help="log2 learning rate (default: "
                   "u-muP's optimum at this width and depth in <out>/lr_transfer_summary.csv)")
    p.add_argument("--extra-seeds", type=int, default=2, help="baseline runs with seeds "
                   "seed+1.. to measure the noise; each multiplier's best value (when not 1) "
                   "is rerun with them too")
    p.add_argument("--no-extend", action="store_true", help="do not extend a sweep whose "
                   "best value sits at its edge (default: extend by powers of 2 up to "
                   "2^+-6)")
    _sweep.add_common_args(p, steps=200, batch_size=16, seq_len=64)
    return p


def best_lr_log2(out: Path, summary_name: str, width: int, depth: int) -> Optional[float]:
    """u-muP's best log2 LR at ``width``/``depth`` in a transfer summary CSV, if there."""
    path = out / summary_name
    if not path.exists():
        return None
    with path.open() as f:
        for r in csv.DictReader(f):
            if (r["parametrization"] == "umup" and int(r["width"]) == width
                    and int(r["depth"]) == depth and r["best_lr_log2"]):
                return float(r["best_lr_log2"])
    return None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    if mode != "full":
        for k, v in (SMOKE if args.smoke else QUICK).items():
            setattr(args, k, v)
    out = _sweep.out_dir(args, mode)
    mults = [m for m in args.multipliers.split(",") if m]
    bad = [m for m in mults if m not in MULTIPLIERS]
    if bad or not mults:
        raise SystemExit(f"--multipliers: unknown {bad}; choose from {', '.join(MULTIPLIERS)}")
    values = sorted(set(_sweep.int_list(args.values)) - {0})
    lr_source = "--lr-log2"
    if args.lr_log2 is None:
        name = "lr_transfer_summary.csv" if mode == "full" else f"lr_transfer_{mode}_summary.csv"
        args.lr_log2 = best_lr_log2(out, name, args.width, args.depth)
        lr_source = str(out / name)
        if args.lr_log2 is None:
            if mode == "full":
                raise SystemExit(f"no u-muP optimum for width {args.width}, depth {args.depth} "
                                 f"in {out / name}: run experiments/lr_transfer.py first (or "
                                 "pass --lr-log2).")
            args.lr_log2, lr_source = 0.0, "default 2^0 (no lr_transfer summary)"
    data = _sweep.data_path(args.data)
    tag = args.tag or ("multiplier_sweeps" if mode == "full" else f"multiplier_sweeps_{mode}")
    settings = {"experiment": "multiplier_sweeps", "width": args.width, "depth": args.depth,
                "d_head": args.d_head, "values_log2": values, "multipliers": mults,
                "lr_log2": args.lr_log2, "steps": args.steps, "batch_size": args.batch_size,
                "seq_len": args.seq_len, "schedule": args.schedule,
                "eval_batches": args.eval_batches, "seed": args.seed,
                "extra_seeds": args.extra_seeds, "data": data}
    store = _sweep.Store(out, tag, settings, resume=not args.fresh)
    store.write_meta(command="python experiments/multiplier_sweeps.py "
                     + " ".join(shlex.quote(a) for a in argv), lr_source=lr_source,
                     machine=_sweep.machine())
    print(f"multiplier_sweeps ({mode}): width {args.width}, depth {args.depth}, lr 2^"
          f"{args.lr_log2:g} (from {lr_source}), values 2^{values}, {args.steps} steps x "
          f"batch {args.batch_size} x seq {args.seq_len}")
    t0 = time.perf_counter()

    def cfg_for(model: dict, seed: int):
        return _sweep.base_config(parametrization="umup", width=args.width, depth=args.depth,
                                  d_head=args.d_head, seq_len=args.seq_len,
                                  batch_size=args.batch_size, steps=args.steps,
                                  schedule=args.schedule, data=data, seed=seed,
                                  eval_batches=args.eval_batches, model=model)

    def one(multiplier: str, value: float, seed: int) -> dict:
        key = {"experiment": "multiplier_sweeps", "multiplier": multiplier,
               "multiplier_value": value, "seed": seed}
        done = store.select(**key)
        if done:
            return done[0]
        model = {} if multiplier == "baseline" else {multiplier: value}
        return _sweep.run_group(store, "multiplier_sweeps", cfg_for(model, seed),
                                [args.lr_log2], multiplier=multiplier,
                                multiplier_value=value)[0]

    base = [one("baseline", 1.0, args.seed + s) for s in range(args.extra_seeds + 1)]
    curves, confirm = {}, {}
    for m in mults:
        pts = {0.0: dict(base[0], multiplier=m)}
        pts.update({float(v): one(m, 2.0 ** v, args.seed) for v in values})
        while not args.no_extend:  # one more power of 2 while the best sits at an edge
            finite = {v: _sweep.score(r) for v, r in pts.items()
                      if math.isfinite(_sweep.score(r))}
            if not finite:
                break
            best, lo, hi = min(finite, key=finite.get), min(pts), max(pts)
            nxt = ([hi + 1] if best == hi and hi < EXTEND_LIMIT else []) + (
                [lo - 1] if best == lo and lo > -EXTEND_LIMIT else [])
            if not nxt:
                break
            pts.update({v: one(m, 2.0 ** v, args.seed) for v in nxt})
        curves[m] = [pts[v] for v in sorted(pts)]
        o = _sweep.optimum(curves[m], "multiplier_value_log2")
        if o["best"] not in (None, 0.0) and args.extra_seeds:
            # is the best value's gain over 1 there for the other seeds too?
            confirm[m] = [one(m, 2.0 ** o["best"], args.seed + s)
                          for s in range(1, args.extra_seeds + 1)]
    summary, noise = summarise(curves, base, confirm)
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    png = plot(curves, base, out / f"{tag}.png",
               title=f"u-μP multiplier sweeps: width {args.width}, depth {args.depth}, lr 2^"
                     f"{args.lr_log2:g}, {args.steps} steps x {args.batch_size} x "
                     f"{args.seq_len} tokens")
    claims = {r["multiplier"]: {
        "best_value": r["best_value"], "gap_of_1": r["gap_of_1"],
        "best_bracketed": r["bracketed"],
        "1_within_factor_2_of_best": (r["best_value"] is not None
                                      and abs(math.log2(r["best_value"])) <= 1),
        "gap_within_baseline_seed_std": (noise is not None and r["gap_of_1"] is not None
                                         and r["gap_of_1"] <= noise),
        "gain_of_best_on_every_seed": (None if r["gain_per_seed"] is None else
                                       all(float(g) > 0 for g in
                                           r["gain_per_seed"].split("/")))}
        for r in summary}
    store.write_meta(claims=claims, seed_std=noise, wall_s=round(time.perf_counter() - t0, 1),
                     finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"baseline val loss over {len(base)} seed(s): "
          + ", ".join(f"{_sweep.score(r):.4f}" for r in base)
          + (f" (std {noise:.4f})" if noise is not None else ""))
    print(f"{'multiplier':20} {'best':>7} {'best loss':>9} {'loss@1':>8} {'gap':>7}  "
          "gain of best over 1, per seed")
    for r in summary:
        best = "none" if r["best_value"] is None else f"{r['best_value']:g}"
        best += "" if r["bracketed"] else " (edge)"
        gap = "" if r["gap_of_1"] is None else f"{r['gap_of_1']:.4f}"
        print(f"{r['multiplier']:20} {best:>7} {r['best_val_loss']:9.4f} "
              f"{r['loss_at_1']:8.4f} {gap:>7}  {r['gain_per_seed'] or ''}")
    print(f"wrote {store.csv}, {out / f'{tag}_summary.csv'}, {png}, {store.meta_path}")
    return {"summary": summary, "claims": claims, "runs": store.rows, "seed_std": noise,
            "png": str(png)}


def summarise(curves: dict, base: list[dict], confirm: Optional[dict] = None):
    """Per multiplier: the best value, the loss gap of 1 to it, and (``confirm``: the best
    value rerun with the baseline's other seeds) the per-seed gains over the baseline."""
    scores = [_sweep.score(r) for r in base]
    noise = (statistics.stdev(scores) if len(scores) > 1 and all(map(math.isfinite, scores))
             else None)
    rows = []
    for m, runs in curves.items():
        at1 = next(_sweep.score(r) for r in runs if r["multiplier_value_log2"] == 0)
        o = _sweep.optimum(runs, "multiplier_value_log2")
        gains = None
        if confirm and m in confirm:
            by_seed = {r["seed"]: _sweep.score(r) for r in base}
            best_runs = [r for r in runs if r["multiplier_value_log2"] == o["best"]]
            gains = [by_seed[r["seed"]] - _sweep.score(r) for r in best_runs + confirm[m]]
        rows.append({"multiplier": m,
                     "best_value": 2.0 ** o["best"] if o["best"] is not None else None,
                     "best_val_loss": o["loss"], "loss_at_1": at1,
                     "gap_of_1": at1 - o["loss"] if math.isfinite(o["loss"]) else None,
                     "vertex_value": 2.0 ** o["vertex"] if o["vertex"] is not None else None,
                     "bracketed": o["bracketed"], "values_tried": o["n_runs"],
                     "n_diverged": o["n_diverged"], "seed_std": noise,
                     "gain_per_seed": None if gains is None else
                     "/".join(f"{g:.4f}" for g in gains),
                     "gain_mean_over_seeds": None if gains is None else
                     sum(gains) / len(gains)})
    return rows, noise


def plot(curves: dict, base: list[dict], path: Path, *, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.6), sharey=True,
                             squeeze=False)
    scores = [s for s in (_sweep.score(r) for r in base) if math.isfinite(s)]
    for ax, (m, runs) in zip(axes[0], curves.items()):
        runs = sorted(runs, key=lambda r: r["multiplier_value_log2"])
        ok = [r for r in runs if math.isfinite(_sweep.score(r))]
        ax.plot([r["multiplier_value_log2"] for r in ok], [r["val_loss"] for r in ok], "o-",
                ms=4)
        if scores:
            mu = statistics.mean(scores)
            sd = statistics.stdev(scores) if len(scores) > 1 else 0.0
            ax.axhspan(mu - sd, mu + sd, color="grey", alpha=0.25, lw=0,
                       label=f"all 1: mean ± std ({len(scores)} seeds)")
        o = _sweep.optimum(runs, "multiplier_value_log2")
        if o["best"] is not None:
            ax.plot([o["best"]], [o["loss"]], "*", ms=14, mec="k")
        for r in runs:
            if not math.isfinite(_sweep.score(r)):
                ax.annotate("diverged", (r["multiplier_value_log2"], 0.98),
                            xycoords=("data", "axes fraction"),
                            ha="center", va="top", fontsize=7, rotation=90)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(m)
        ax.set_xlabel("log2 multiplier")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation loss (nats / byte)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    main()
