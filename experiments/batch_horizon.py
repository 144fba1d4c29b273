"""The optimal learning rate of u-muP and SP (Adam) against batch size and training horizon.

At a fixed width and depth (the proxy of ``umup_workflow.py``: width 64, depth 4, head width
8; the byte-level decoder on tiny Shakespeare, Adam without weight decay, 10% warmup then a
cosine to 0.1x), for u-muP (``unitscale_jax.optim`` Adam) and SP (optax Adam, init std
0.02), the peak learning rate is swept over powers of 2 (grids extended while their best point
sits at an edge) at

* four batch sizes over 8x (``--batch-sizes``, default 8, 16, 32, 64) **at the same tokens**
  (``--tokens`` per run; steps = tokens / (batch x sequence length)), and
* three horizons over 4x (``--horizons``, default 100, 200, 400 steps) at one batch size
  (``--horizon-batch``, default 16; the tokens grow with the steps).

A configuration both axes share (batch 16 x 400 steps by default) is trained once. Each
curve's optimum is the vertex of the parabola through its best point and its two neighbours
(log2 units; the best grid point where the curve is not bracketed), per seed. The fit, per
parametrization and axis, is the least-squares line ``log2 LR* = c + k log2 x`` through every
seed's optimum, with the standard error of ``k`` and its 95% interval (Student t); a rule is
*consistent* when its exponent lies in that interval: batch size -- constant LR (k = 0), LR ∝
sqrt(B) (k = 1/2), LR ∝ B (k = 1); horizon -- constant (k = 0), LR ∝ T^-1/2, LR ∝ 1/T.

Outputs in ``--out`` (default ``experiments/results/``; ``.../quick/`` with ``--quick``):
``batch_horizon_runs.csv`` (every run; resumable, also with more ``--seeds``),
``batch_horizon_summary.csv`` (each curve's optimum), ``batch_horizon_fits.csv`` (k, its
standard error and interval, the rules consistent with it), ``batch_horizon.png`` and
``batch_horizon_meta.json``. ``--estimate`` times a few steps of every shape and writes the
projected cost to ``batch_horizon_estimate.json`` instead of training.

    python experiments/batch_horizon.py --seeds 0,1,2   # full
    python experiments/batch_horizon.py --estimate      # its cost on this machine
    python experiments/batch_horizon.py --quick         # minutes on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import _sweep
from umup_workflow import LR_LIMITS, sp_prior_log2

EXPERIMENT = "batch_horizon"
RULES = {"batch": {"constant LR": 0.0, "LR ∝ sqrt(B)": 0.5, "LR ∝ B": 1.0},
         "horizon": {"constant LR": 0.0, "LR ∝ T^-1/2": -0.5, "LR ∝ 1/T": -1.0}}
QUICK = {"width": 16, "depth": 1, "batch_sizes": "2,4,8,16", "tokens": 8192,
         "horizon_batch": 4, "horizons": "16,32,64", "seq_len": 16, "eval_batches": 4,
         "umup_lrs": "-2:1", "sp_offsets": "-1:2", "no_extend": True}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (minutes on a 2-core "
                   "CPU); writes batch_horizon_quick_* under results/quick/")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--d-head", type=int, default=8, help="head width (heads = width / d_head)")
    p.add_argument("--batch-sizes", default="8,16,32,64", help="batch sizes of the batch "
                   "axis (comma-separated), all at --tokens")
    p.add_argument("--tokens", type=int, default=409_600, help="tokens per run of the batch "
                   "axis (divisible by every batch size x --seq-len)")
    p.add_argument("--horizons", default="100,200,400", help="steps of the horizon axis")
    p.add_argument("--horizon-batch", type=int, default=16, help="batch size of the horizon "
                   "axis")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--umup-lrs", default="-2:2", help="initial log2 LR grid of u-muP")
    p.add_argument("--sp-offsets", default="-2:2", help="initial log2 LR grid of SP, as "
                   "offsets from its 1/width prior log2(2^-2 / width)")
    p.add_argument("--parametrizations", default="umup,sp")
    p.add_argument("--seeds", default=None, help="seeds, comma-separated (default: --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-extend", action="store_true", help="do not extend a grid whose best "
                   "point sits at its edge")
    p.add_argument("--schedule", default="warmup_cosine", choices=("constant", "warmup_cosine"))
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--data", default=None, help="text file (default: "
                   "../shared/data/tinyshakespeare/input.txt) or 'builtin'")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--fresh", action="store_true", help="ignore runs already in the CSV")
    p.add_argument("--estimate", action="store_true", help="train nothing: time a few steps "
                   "of every shape and write the projected cost")
    p.add_argument("--estimate-steps", type=int, default=3)
    return p


def points(args) -> dict:
    """``{"batch": [(B, steps), ...], "horizon": [(B, steps), ...]}``; a ``SystemExit`` (one
    line) for bad lists."""
    bs, hs = _sweep.int_list(args.batch_sizes), _sweep.int_list(args.horizons)
    if len(bs) < 2 or len(hs) < 2 or min(bs + hs) <= 0 or args.horizon_batch <= 0:
        raise SystemExit(f"--batch-sizes and --horizons need at least two positive values "
                         f"each, got {bs} and {hs}")
    bad = [b for b in bs if args.tokens % (b * args.seq_len)]
    if bad:
        raise SystemExit(f"--tokens {args.tokens} is not a multiple of batch x --seq-len "
                         f"{args.seq_len} for batch sizes {bad}")
    if args.width % args.d_head:
        raise SystemExit(f"--width {args.width} is not a multiple of --d-head {args.d_head}")
    return {"batch": [(b, args.tokens // (b * args.seq_len)) for b in sorted(bs)],
            "horizon": [(args.horizon_batch, t) for t in sorted(hs)]}


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    mode = _sweep.apply_quick(args, argv, QUICK)
    pars = _sweep.parametrizations(args.parametrizations)
    axes = points(args)
    seeds = _sweep.int_list(args.seeds) if args.seeds else [args.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds must be distinct integers, got {args.seeds!r}")
    data = _sweep.data_path(args.data)
    out = _sweep.out_dir(args, mode)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or (EXPERIMENT if mode == "full" else f"{EXPERIMENT}_{mode}")
    grids = {"umup": _sweep.int_list(args.umup_lrs),
             "sp": [sp_prior_log2(args.width) + o for o in _sweep.int_list(args.sp_offsets)]}
    settings = {"experiment": EXPERIMENT, "width": args.width, "depth": args.depth,
                "d_head": args.d_head, "seq_len": args.seq_len, "tokens": args.tokens,
                "points": {k: [list(p) for p in v] for k, v in axes.items()},
                "schedule": args.schedule, "eval_batches": args.eval_batches, "seed": seeds[0],
                "data": data, "grids": grids, "parametrizations": pars,
                "extend": not args.no_extend, "optimizer": "adam (no weight decay)",
                "sp_init_std": 0.02}

    def cfg_for(par: str, batch: int, steps: int, seed: int):
        return _sweep.base_config(parametrization=par, width=args.width, depth=args.depth,
                                  d_head=args.d_head, seq_len=args.seq_len, batch_size=batch,
                                  steps=steps, schedule=args.schedule, data=data, seed=seed,
                                  eval_batches=args.eval_batches)

    configs = sorted(set(axes["batch"]) | set(axes["horizon"]))
    if args.estimate:
        plan = [{"label": f"{par} batch {b} x {t} steps", "cfg": cfg_for(par, b, t, 0),
                 "lanes": len(grids[par]), "groups": len(seeds)}
                for par in pars for b, t in configs]
        log(f"batch_horizon --estimate: timing {args.estimate_steps} steps of each shape")
        est = _sweep.estimate_cost(plan, steps=args.estimate_steps, log=log)
        est.update(settings=settings, seeds=seeds, note="initial grids only: each extension "
                   "adds a group of 2 lanes; validation passes not counted")
        return _sweep.write_estimate(out / f"{tag}_estimate.json", est, log)

    store = _sweep.Store(out, tag, settings, resume=not args.fresh, log=log)
    est_path = out / f"{tag}_estimate.json"
    est = json.loads(est_path.read_text()) if est_path.exists() else None
    store.write_meta(command="python experiments/batch_horizon.py "
                     + " ".join(shlex.quote(a) for a in argv), machine=_sweep.machine(),
                     seeds=seeds,
                     cost_estimate=est if est and est.get("settings") == settings else None)
    t0 = time.perf_counter()
    log(f"batch_horizon ({mode}): width {args.width}, depth {args.depth}; batch axis "
        f"{axes['batch']} (batch, steps) at {args.tokens:,} tokens; horizon axis "
        f"{axes['horizon']}; seeds {seeds}")
    curves: dict = {}
    for par in pars:
        for b, t in configs:
            curves[(par, b, t)] = _sweep.sweep_curve(
                store, "lr", lambda seed, par=par, b=b, t=t: cfg_for(par, b, t, seed),
                grids[par], LR_LIMITS[par], extend=not args.no_extend,
                key={"parametrization": par, "batch_size": b, "steps": t}, seeds=seeds, log=log)
    summary = summarise(store, curves, axes, pars, seeds)
    fits = [fit(summary, par, axis) for par in pars for axis in axes]
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    _sweep.write_csv(out / f"{tag}_fits.csv", [{k: (", ".join(v) if isinstance(v, list)
                                                    else v) for k, v in f.items()}
                                                for f in fits])
    png = plot(curves, summary, fits, axes, pars, out / f"{tag}.png",
               title=f"optimal LR against batch size and horizon ({mode}): width {args.width},"
                     f" depth {args.depth}, seq {args.seq_len}, Adam, {args.schedule}, "
                     f"{len(seeds)} seed(s)")
    claims = {f"{f['parametrization']}_{f['axis']}": {
        "k": f["k"], "k_se": f["k_se"], "k_95": [f["k_lo"], f["k_hi"]],
        "consistent_rules": f["consistent_rules"], "closest_rule": f["closest_rule"],
        "curves_with_the_optimum_at_a_grid_edge": f["n_unbracketed_curves"]}
        for f in fits}
    store.write_meta(claims=claims, wall_s=round(time.perf_counter() - t0, 1),
                     finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    for f in fits:
        log(f"{f['parametrization']:5} {f['axis']:8} k = {f['k']:+.3f} ± {f['k_se']:.3f} "
            f"(95%: {f['k_lo']:+.2f} .. {f['k_hi']:+.2f}; n {f['n_points']}): consistent "
            f"with {f['consistent_rules'] or 'none'}; closest {f['closest_rule']}"
            + (f" ({f['n_unbracketed_curves']} optima at a grid edge)"
               if f["n_unbracketed_curves"] else "")
            if f["k_se"] is not None else
            f"{f['parametrization']:5} {f['axis']:8} k = {f['k']} (too few points for an "
            "error)")
    log(f"wrote {store.csv}, {out / f'{tag}_summary.csv'}, {out / f'{tag}_fits.csv'}, {png}, "
        f"{store.meta_path}")
    return {"summary": summary, "fits": fits, "claims": claims, "runs": store.rows,
            "png": str(png)}


def seed_optimum(rows: Sequence[dict]) -> tuple[Optional[float], str]:
    """One seed's optimum (log2 LR) and how it was found: the parabola vertex, else the best
    grid point."""
    o = _sweep.optimum(rows)
    if o["vertex"] is not None:
        return o["vertex"], "vertex"
    return o["best"], "grid" if o["best"] is not None else "none"


def summarise(store, curves: dict, axes: dict, pars: Sequence[str],
              seeds: Sequence[int]) -> list[dict]:
    """One row per parametrization, axis and point: the seed-averaged curve's optimum and
    every seed's own."""
    rows = []
    for par in pars:
        for axis, pts in axes.items():
            for b, t in pts:
                o = _sweep.optimum(curves[(par, b, t)])
                runs = store.select(experiment="lr", parametrization=par, batch_size=b,
                                    steps=t)
                per_seed = [seed_optimum([r for r in runs if r["seed"] == s]) for s in seeds]
                rows.append({
                    "parametrization": par, "axis": axis, "x": b if axis == "batch" else t,
                    "batch_size": b, "steps": t, "tokens": runs[0]["tokens"],
                    "best_lr_log2": o["best"], "vertex_lr_log2": o["vertex"],
                    "bracketed": o["bracketed"], "best_val_loss": o["loss"],
                    "n_lrs": o["n_runs"], "n_diverged": o["n_diverged"],
                    "seed_opt_lr_log2": "/".join("none" if v is None else f"{v:.3f}"
                                                 for v, _ in per_seed),
                    "seed_opt_kind": "/".join(k for _, k in per_seed)})
    return rows


def fit(summary: Sequence[dict], par: str, axis: str) -> dict:
    """The least-squares line ``log2 LR* = c + k log2 x`` through every seed's optimum
    (``_sweep.line_fit``), with the rules whose exponent lies in the 95% interval of ``k``
    and the closest one."""
    xs, ys = [], []
    for r in summary:
        if r["parametrization"] == par and r["axis"] == axis:
            for v in r["seed_opt_lr_log2"].split("/"):
                if v != "none":
                    xs.append(math.log2(r["x"]))
                    ys.append(float(v))
    edges = sum(1 for r in summary if r["parametrization"] == par and r["axis"] == axis
                and not r["bracketed"])
    out = {"parametrization": par, "axis": axis, **_sweep.line_fit(xs, ys),
           "n_unbracketed_curves": edges, "consistent_rules": [], "closest_rule": None}
    rules = RULES[axis]
    if out["k"] is not None:
        out["closest_rule"] = min(rules, key=lambda name: abs(rules[name] - out["k"]))
    if out["k_se"] is not None:
        out["consistent_rules"] = [name for name, k0 in rules.items()
                                   if out["k_lo"] <= k0 <= out["k_hi"]]
    return out


def plot(curves: dict, summary: Sequence[dict], fits: Sequence[dict], axes: dict,
         pars: Sequence[str], path: Path, *, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"umup": "u-μP", "sp": "SP"}
    fig, grid = plt.subplots(2, len(pars) + 1, figsize=(5.2 * (len(pars) + 1), 8.4),
                             squeeze=False)
    cmap = plt.get_cmap("viridis")
    for row, (axis, pts) in enumerate(axes.items()):
        for col, par in enumerate(pars):
            ax = grid[row][col]
            for j, (b, t) in enumerate(pts):
                ok = [r for r in curves[(par, b, t)] if math.isfinite(_sweep.score(r))]
                lab = f"batch {b} ({t} steps)" if axis == "batch" else f"{t} steps (batch {b})"
                ax.plot([r["lr_log2"] for r in ok], [r["val_loss"] for r in ok], "o-", ms=4,
                        color=cmap(j / max(1, len(pts) - 1) * 0.9), label=lab)
            ax.set_title(f"{names[par]}: {axis} axis")
            ax.set_xlabel("log2 learning rate")
            ax.set_ylabel("validation loss (nats / byte)")
        ax = grid[row][-1]
        for par in pars:
            rs = [r for r in summary if r["parametrization"] == par and r["axis"] == axis]
            for r in rs:
                vs = [float(v) for v in r["seed_opt_lr_log2"].split("/") if v != "none"]
                ax.plot([math.log2(r["x"])] * len(vs), vs, "o", ms=4, alpha=0.6,
                        color="C0" if par == "umup" else "C1")
            f = next(f for f in fits if f["parametrization"] == par and f["axis"] == axis)
            if f["k"] is not None:
                x = [math.log2(rs[0]["x"]), math.log2(rs[-1]["x"])]
                se = "" if f["k_se"] is None else f" ± {f['k_se']:.2f}"
                ax.plot(x, [f["c"] + f["k"] * v for v in x], "-",
                        color="C0" if par == "umup" else "C1",
                        label=f"{names[par]}: k = {f['k']:.2f}{se}")
        ax.set_xlabel(f"log2 {'batch size' if axis == 'batch' else 'steps'}")
        ax.set_ylabel("log2 optimal LR (per seed)")
        ax.set_title(f"fit log2 LR* = c + k log2 {'B' if axis == 'batch' else 'T'}")
    for ax in grid.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _sweep.save_figure(fig, path, title)


if __name__ == "__main__":
    main()
