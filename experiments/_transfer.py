"""Learning-rate transfer across one axis (width or depth), shared by ``lr_transfer.py`` and
``depth_transfer.py``.

For each parametrization (u-muP with ``unitscale_jax.optim``'s Adam, SP with optax's Adam and
GPT-2 init std 0.02) and each value of the axis, a sweep of the peak learning rate over powers
of 2 at a fixed token budget (the same steps x batch x sequence length for every run), no
weight decay, the same schedule for both. Outputs in ``--out``: ``<tag>_runs.csv`` (every run),
``<tag>_summary.csv`` (the optimum of each curve), ``<tag>.png`` (loss against log2 LR, one
curve per width/depth, a panel per parametrization) and ``<tag>_meta.json`` (settings,
command, machine, timings, the claims checked).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import _sweep

PARAMS = ("umup", "sp", "umup_a1")
"""``umup_a1``: u-muP with CompleteP's depth exponent 1 (``TransformerConfig.depth_exponent``:
residual branches weighted ``n_layers^-1``, no learning-rate depth factor), on u-muP's grid."""


def build_parser(axis: str, doc: str, *, values: str, fixed: int, d_head: int, steps: int,
                 batch_size: int, seq_len: int, umup_lrs: str, sp_lrs: str):
    other = "depth" if axis == "width" else "width"
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(f"--{axis}s", default=values, help=f"{axis}s to sweep (comma-separated)")
    p.add_argument(f"--{other}", type=int, default=fixed, help=f"fixed {other}")
    p.add_argument("--d-head", type=int, default=d_head,
                   help="head width (heads = width / d_head)")
    p.add_argument("--umup-lrs", default=umup_lrs, help="initial log2 LR grid of u-muP (a:b "
                   "or comma-separated)")
    p.add_argument("--sp-lrs", default=sp_lrs, help="initial log2 LR grid of SP")
    p.add_argument("--no-extend", action="store_true", help="do not extend a grid whose best "
                   "run sits at its edge")
    p.add_argument("--parametrizations", default="umup,sp")
    p.add_argument("--seeds", default=None, help="seeds (initialisation and data order) to "
                   "average each point over, comma-separated (default: --seed alone)")
    _sweep.add_common_args(p, steps=steps, batch_size=batch_size, seq_len=seq_len)
    return p


QUICK = {"steps": 40, "batch_size": 8, "seq_len": 32, "eval_batches": 8}
SMOKE = {"steps": 6, "batch_size": 4, "seq_len": 16, "eval_batches": 2}


def apply_mode(args, axis: str, *, quick_values: str, smoke_values: str, quick_lrs: dict,
               smoke_lrs: dict, quick_fixed: int, smoke_fixed: int) -> str:
    """``--quick``/``--smoke`` replace the sizes (explicit flags still win only in full mode)."""
    other = "depth" if axis == "width" else "width"
    if args.quick or args.smoke:
        mode = "smoke" if args.smoke else "quick"
        for k, v in (SMOKE if args.smoke else QUICK).items():
            setattr(args, k, v)
        setattr(args, f"{axis}s", smoke_values if args.smoke else quick_values)
        setattr(args, other, smoke_fixed if args.smoke else quick_fixed)
        lrs = smoke_lrs if args.smoke else quick_lrs
        args.umup_lrs, args.sp_lrs = lrs["umup"], lrs["sp"]
        args.d_head = 8
        args.no_extend = True
        return mode
    return "full"


def run(args, axis: str, experiment: str, argv: Sequence[str], mode: str,
        log: Callable[[str], None] = print) -> dict:
    other = "depth" if axis == "width" else "width"
    values = _sweep.int_list(getattr(args, f"{axis}s"))
    pars = [p for p in args.parametrizations.split(",") if p]
    bad = [p for p in pars if p not in PARAMS]
    if bad or not pars:
        raise SystemExit(f"--parametrizations takes {', '.join(PARAMS)}, got "
                         f"{args.parametrizations!r}")
    if len(values) < 2:
        raise SystemExit(f"--{axis}s needs at least two values, got {values}")
    seeds = _sweep.int_list(args.seeds) if args.seeds else [args.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds must be distinct integers, got {args.seeds!r}")
    data = _sweep.data_path(args.data)
    tag = args.tag or (experiment if mode == "full" else f"{experiment}_{mode}")
    grids = {"umup": _sweep.int_list(args.umup_lrs), "sp": _sweep.int_list(args.sp_lrs)}
    grids["umup_a1"] = grids["umup"]
    settings = {"experiment": experiment, "axis": axis, f"{axis}s": values,
                other: getattr(args, other), "d_head": args.d_head, "steps": args.steps,
                "batch_size": args.batch_size, "seq_len": args.seq_len,
                "schedule": args.schedule, "eval_batches": args.eval_batches,
                "seed": seeds[0], "data": data, "grids": grids, "extend": not args.no_extend,
                "parametrizations": pars, "optimizer": "adam (no weight decay)",
                "sp_init_std": 0.02}
    out = _sweep.out_dir(args, mode)
    store = _sweep.Store(out, tag, settings, resume=not args.fresh, log=log)
    store.write_meta(command="python experiments/" + Path(sys.argv[0]).name + " "
                     + " ".join(shlex.quote(a) for a in argv) if argv is not None else None,
                     machine=_sweep.machine(), seeds=seeds)
    t0 = time.perf_counter()
    limits = {"umup": (-8, 8), "sp": (-18, 0), "umup_a1": (-8, 8)}
    log(f"{experiment} ({mode}): {axis}s {values}, {other} {getattr(args, other)}, "
        f"{args.steps} steps x batch {args.batch_size} x seq {args.seq_len} "
        f"= {args.steps * args.batch_size * args.seq_len:,} tokens per run; seeds {seeds}; "
        f"data {data}")
    curves: dict = {p: {} for p in pars}
    per_seed: dict = {p: {} for p in pars}
    for v in values:
        shape = {axis: v, other: getattr(args, other)}
        for par in pars:
            def cfg_for(seed, par=par, shape=shape):
                return _sweep.base_config(
                    parametrization=par.split("_")[0], width=shape["width"],
                    depth=shape["depth"], d_head=args.d_head, seq_len=args.seq_len,
                    batch_size=args.batch_size, steps=args.steps, schedule=args.schedule,
                    data=data, seed=seed, eval_batches=args.eval_batches,
                    model={"depth_exponent": 1.0} if par == "umup_a1" else None)

            key = {"parametrization": par, "width": shape["width"], "depth": shape["depth"]}
            curves[par][v] = _sweep.sweep_curve(store, experiment, cfg_for, grids[par],
                                                limits[par], extend=not args.no_extend,
                                                key=key, seeds=seeds, log=log)
            per_seed[par][v] = {s: [r for r in store.select(experiment=experiment, **key)
                                    if r["seed"] == s] for s in seeds}
    summary, claims = summarise(curves, axis, other, getattr(args, other), per_seed)
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    title = (f"{experiment}: byte-level decoder, {axis} {values}, {other} "
             f"{getattr(args, other)}; {args.steps} steps x {args.batch_size} x {args.seq_len} "
             f"tokens, Adam, {args.schedule}, no weight decay")
    png = _sweep.plot_lr_curves(curves, out / f"{tag}.png", title=title, label=axis)
    store.write_meta(claims=claims, wall_s=round(time.perf_counter() - t0, 1),
                     compute_s_all_groups=round(sum(r["group_wall_s"] for r in {
                         (r["parametrization"], r["width"], r["depth"], r["seed"],
                          r["group_wall_s"]): r for r in store.rows}.values()), 1),
                     finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    log(format_summary(summary, axis))
    for k, c in claims.items():
        log(f"claim {k}: {c}")
    log(f"wrote {store.csv}, {out / f'{tag}_summary.csv'}, {png}, {store.meta_path}")
    return {"summary": summary, "claims": claims, "runs": store.rows, "png": str(png),
            "csv": str(store.csv)}


def summarise(curves: dict, axis: str, other: str, other_value: int,
              per_seed: Optional[dict] = None):
    """Per curve (seed-averaged): the optimum; per parametrization: how far it moves, the loss
    lost by reusing the smallest model's optimum, and whether the best loss improves along
    the axis. With ``per_seed`` also each seed's own optimum."""
    summary, claims = [], {}
    for par, by_value in curves.items():
        values = sorted(by_value)
        opts = {v: _sweep.optimum(by_value[v]) for v in values}
        seed_opts = {v: {s: _sweep.optimum(rows)["best"]
                         for s, rows in (per_seed or {}).get(par, {}).get(v, {}).items()}
                     for v in values}
        ref = opts[values[0]]["best"]
        for v in values:
            o = opts[v]
            at_ref = [r for r in by_value[v] if ref is not None and r["lr_log2"] == ref]
            loss_ref = _sweep.score(at_ref[0]) if at_ref else None
            summary.append({
                "parametrization": par, axis: v, other: other_value,
                "best_lr_log2": o["best"], "best_lr": 2.0 ** o["best"] if o["best"] is not None
                else None, "best_val_loss": o["loss"], "vertex_lr_log2": o["vertex"],
                "bracketed": o["bracketed"], "n_runs": o["n_runs"],
                "n_diverged": o["n_diverged"],
                "n_seeds": max((r.get("n_seeds", 1) for r in by_value[v]), default=1),
                "best_val_loss_std": next((r.get("val_loss_std") for r in by_value[v]
                                           if r["lr_log2"] == o["best"]), None),
                "best_lr_log2_per_seed": "/".join(
                    "none" if b is None else f"{b:g}" for b in seed_opts[v].values()),
                f"loss_at_lr_of_smallest_{axis}": loss_ref,
                "transfer_gap": (loss_ref - o["loss"]) if loss_ref is not None else None})
        bests = [opts[v]["best"] for v in values if opts[v]["best"] is not None]
        verts = [opts[v]["vertex"] for v in values if opts[v]["vertex"] is not None]
        losses = [opts[v]["loss"] for v in values]
        claims[par] = {
            "best_lr_log2": {v: opts[v]["best"] for v in values},
            "optimum_shift_log2": (max(bests) - min(bests)) if bests else None,
            "vertex_shift_log2": (round(max(verts) - min(verts), 3)
                                  if len(verts) == len(values) else None),
            "all_bracketed": all(opts[v]["bracketed"] for v in values),
            "loss_improves_along_axis": all(b < a for a, b in zip(losses, losses[1:])),
            "best_losses": {v: round(opts[v]["loss"], 4) for v in values},
            "best_lr_log2_per_seed": {v: seed_opts[v] for v in values},
        }
    if "umup" in claims:
        claims["umup_optimum_moves_at_most_one_factor_of_2"] = (
            claims["umup"]["optimum_shift_log2"] is not None
            and claims["umup"]["optimum_shift_log2"] <= 1)
    if "umup_a1" in claims:
        claims["umup_a1_optimum_moves_at_most_one_factor_of_2"] = (
            claims["umup_a1"]["optimum_shift_log2"] is not None
            and claims["umup_a1"]["optimum_shift_log2"] <= 1)
    if "umup" in claims and "umup_a1" in claims:
        su, sa = claims["umup"]["optimum_shift_log2"], claims["umup_a1"]["optimum_shift_log2"]
        claims["depth_exponent_keeping_the_optimum_fixed"] = (
            None if su is None or sa is None else "tie" if su == sa
            else "1 (CompleteP)" if sa < su else "0.5 (u-muP)")
    if "umup" in claims and "sp" in claims:
        su, ss = claims["umup"]["optimum_shift_log2"], claims["sp"]["optimum_shift_log2"]
        claims["sp_optimum_moves_more_than_umup"] = (su is not None and ss is not None
                                                     and ss > su)
    return summary, claims


def format_summary(summary: Sequence[dict], axis: str) -> str:
    lines = [f"{'param':6} {axis:>6} {'best log2 lr':>12} {'vertex':>7} {'val loss':>9} "
             f"{'points':>6} {'div':>4} {'gap@small-opt':>13}  per-seed optima"]
    for r in summary:
        vx = "" if r["vertex_lr_log2"] is None else f"{r['vertex_lr_log2']:.2f}"
        gap = "" if r["transfer_gap"] is None else f"{r['transfer_gap']:.4f}"
        best = "none" if r["best_lr_log2"] is None else f"{r['best_lr_log2']:g}"
        star = "" if r["bracketed"] else " (edge)"
        lines.append(f"{r['parametrization']:6} {r[axis]:>6} {best + star:>12} {vx:>7} "
                     f"{r['best_val_loss']:9.4f} {r['n_runs']:6d} {r['n_diverged']:4d} "
                     f"{gap:>13}  {r['best_lr_log2_per_seed']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]], *, axis: str, experiment: str, doc: str,
         defaults: dict, modes: dict) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(axis, doc, **defaults).parse_args(argv)
    mode = apply_mode(args, axis, **modes)
    return run(args, axis, experiment, argv, mode)
