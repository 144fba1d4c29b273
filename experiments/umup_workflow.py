"""The u-muP workflow (Figure 1 of the u-muP paper): tune on a small proxy, transfer unchanged.

On a proxy (``--proxy-width``, default 64, ``--depth`` 4; the byte-level decoder on tiny
Shakespeare of ``lr_transfer.py``, Adam without weight decay, one token budget for every run):

1. sweep u-muP's learning rate with every multiplier at 1 (powers of 2, a grid extended while
   its best point sits at an edge); the proxy LR is the best point of the seed-averaged curve;
2. sweep each multiplier of ``multiplier_sweeps.py`` (``attn_mult``, ``act_mult``,
   ``residual_mult``, ``residual_attn_ratio``, ``loss_mult``) on its own at the proxy LR with
   the other four at 1 -- the paper's *independent search* -- over powers of 2 (``--values``,
   extended by one power while the best sits at an edge, up to 2^+-6);
3. combine each multiplier's best value and train the combination, at the proxy LR unchanged,
   at the proxy width and at ``--widths`` (default 128, 256, 512; same depth, same head width
   8, so more heads). ``--transfer-offsets`` also trains it at the proxy LR times
   2^offset, to show whether the optimum moved; the claim uses the proxy LR itself.

The comparison at every width: SP (optax Adam, GPT-2 init std 0.02) with its own full LR sweep
at that width (the grid starts around SP's 1/width optimum of ``lr_transfer.py``,
2^-2 / width, and is extended while its best point sits at an edge) and u-muP with every
multiplier at 1 and **its own LR sweep** at that width (not the proxy's LR). The claim
tested: the transferred u-muP reaches a validation loss at most that of tuned SP at the
largest width. With ``--seeds`` every point is averaged over the seeds (initialisation and
data order); per-seed differences are in the meta.

Outputs in ``--out`` (default ``experiments/results/``; ``.../quick/`` with ``--quick``):
``umup_workflow_runs.csv`` (every run; resumable: a rerun with the same settings trains only
what is missing, and ``--seeds 0`` then ``--seeds 0,1,2`` trains only seeds 1 and 2),
``umup_workflow_summary.csv`` (per width and arm), ``umup_workflow.png`` (loss against width;
the proxy's multiplier sweeps; the LR curves at the largest width) and
``umup_workflow_meta.json`` (settings, command, machine, the claims, the combined multipliers).
``--estimate`` trains nothing: it times a few steps of every shape of the full plan and writes
the projected cost to ``umup_workflow_estimate.json`` (copied into the meta of a later run with
the same settings).

    python experiments/umup_workflow.py --seeds 0,1,2   # full
    python experiments/umup_workflow.py --estimate      # its cost on this machine, no training
    python experiments/umup_workflow.py --quick         # minutes on a 2-core CPU
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
from multiplier_sweeps import EXTEND_LIMIT, MULTIPLIERS

EXPERIMENT = "umup_workflow"
LR_LIMITS = {"umup": (-8, 8), "sp": (-20, 0)}
ARMS = ("sp_tuned", "umup_default_tuned", "umup_transferred")
QUICK = {"proxy_width": 16, "widths": "32,64", "depth": 2, "steps": 40, "batch_size": 8,
         "seq_len": 32, "eval_batches": 8, "umup_lrs": "-2:0", "sp_offsets": "-1:2",
         "values": "-1,1", "transfer_offsets": "0", "no_extend": True}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--proxy-width", type=int, default=64, help="width of the tuned proxy")
    p.add_argument("--widths", default="128,256,512", help="widths the proxy's "
                   "hyperparameters are transferred to (comma-separated)")
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--d-head", type=int, default=8, help="head width (heads = width / d_head)")
    p.add_argument("--umup-lrs", default="-2:2", help="initial log2 LR grid of u-muP's sweeps "
                   "(a:b or comma-separated)")
    p.add_argument("--sp-offsets", default="-2:2", help="initial log2 LR grid of SP's sweeps, "
                   "as offsets from its 1/width prior log2(2^-2 / width)")
    p.add_argument("--values", default="-2:2", help="log2 multiplier values of the proxy's "
                   "independent search (1 is always included)")
    p.add_argument("--multipliers", default=",".join(MULTIPLIERS))
    p.add_argument("--transfer-offsets", default="-1,0,1", help="log2 offsets from the proxy "
                   "LR at which the transferred model is trained (0 is always included)")
    p.add_argument("--seeds", default=None, help="seeds to average every point over, "
                   "comma-separated (default: --seed alone)")
    p.add_argument("--no-extend", action="store_true", help="do not extend a grid whose best "
                   "point sits at its edge")
    p.add_argument("--estimate", action="store_true", help="train nothing: time a few steps "
                   "of every shape of the plan and write the projected cost")
    p.add_argument("--estimate-steps", type=int, default=3, help="steps timed per shape")
    _sweep.add_common_args(p, steps=200, batch_size=16, seq_len=64)
    return p


def sp_prior_log2(width: int) -> int:
    """SP's optimum as ``lr_transfer.py`` measured it (2^-6 .. 2^-9 at widths 16 .. 128):
    log2 of 2^-2 / width, rounded."""
    return round(-2 - math.log2(width))


def combined_label(best: dict) -> str:
    """The ``multiplier`` column of the transferred runs: ``combined:attn_mult=8,...`` (the
    multipliers that are not 1), so that other combined values are other runs."""
    return "combined:" + (",".join(f"{m}={v:g}" for m, v in best.items() if v != 1.0) or "none")


def check_args(args) -> dict:
    """The parsed lists; a ``SystemExit`` (one line) for bad ones."""
    if args.smoke:
        raise SystemExit("umup_workflow.py has no --smoke mode; use --quick.")
    widths = _sweep.int_list(args.widths)
    mults = [m for m in args.multipliers.split(",") if m]
    bad = [m for m in mults if m not in MULTIPLIERS]
    if bad or not mults:
        raise SystemExit(f"--multipliers: unknown {bad}; choose from {', '.join(MULTIPLIERS)}")
    if not widths or args.proxy_width in widths:
        raise SystemExit(f"--widths needs at least one width other than the proxy's "
                         f"({args.proxy_width}), got {widths}")
    bad_w = [w for w in [args.proxy_width] + widths if w <= 0 or w % args.d_head]
    if bad_w:
        raise SystemExit(f"every width must be a positive multiple of --d-head {args.d_head}: "
                         f"{bad_w}")
    seeds = _sweep.int_list(args.seeds) if args.seeds else [args.seed]
    if not seeds or len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds must be distinct integers, got {args.seeds!r}")
    return {"widths": sorted(widths), "mults": mults, "seeds": seeds,
            "values": sorted(set(_sweep.int_list(args.values)) - {0}),
            "offsets": sorted(set(_sweep.int_list(args.transfer_offsets)) | {0}),
            "umup_lrs": _sweep.int_list(args.umup_lrs),
            "sp_offsets": _sweep.int_list(args.sp_offsets)}


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    mode = _sweep.apply_quick(args, argv, QUICK)
    a = check_args(args)
    data = _sweep.data_path(args.data)
    out = _sweep.out_dir(args, mode)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or (EXPERIMENT if mode == "full" else f"{EXPERIMENT}_{mode}")
    all_widths = [args.proxy_width] + a["widths"]
    settings = {"experiment": EXPERIMENT, "proxy_width": args.proxy_width,
                "widths": a["widths"], "depth": args.depth, "d_head": args.d_head,
                "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
                "schedule": args.schedule, "eval_batches": args.eval_batches,
                "seed": a["seeds"][0], "data": data, "umup_lrs": a["umup_lrs"],
                "sp_offsets": a["sp_offsets"], "values_log2": a["values"],
                "multipliers": a["mults"], "transfer_offsets": a["offsets"],
                "extend": not args.no_extend, "optimizer": "adam (no weight decay)",
                "sp_init_std": 0.02, "umup_default_lr": "own sweep at every width"}

    def cfg_for(par: str, width: int, seed: int, model: Optional[dict] = None):
        return _sweep.base_config(parametrization=par, width=width, depth=args.depth,
                                  d_head=args.d_head, seq_len=args.seq_len,
                                  batch_size=args.batch_size, steps=args.steps,
                                  schedule=args.schedule, data=data, seed=seed,
                                  eval_batches=args.eval_batches, model=model)

    if args.estimate:
        return estimate(args, a, settings, cfg_for, out / f"{tag}_estimate.json", log)

    store = _sweep.Store(out, tag, settings, resume=not args.fresh, log=log)
    est_path = out / f"{tag}_estimate.json"
    est = json.loads(est_path.read_text()) if est_path.exists() else None
    store.write_meta(command="python experiments/umup_workflow.py "
                     + " ".join(shlex.quote(x) for x in argv), machine=_sweep.machine(),
                     seeds=a["seeds"],
                     cost_estimate=est if est and est.get("settings") == settings else None)
    t0 = time.perf_counter()
    seeds, extend = a["seeds"], not args.no_extend
    log(f"umup_workflow ({mode}): proxy width {args.proxy_width} -> widths {a['widths']}, "
        f"depth {args.depth}, {args.steps} steps x {args.batch_size} x {args.seq_len} = "
        f"{args.steps * args.batch_size * args.seq_len:,} tokens per run; seeds {seeds}")

    def lr_sweep(par: str, width: int) -> list[dict]:
        initial = (a["umup_lrs"] if par == "umup"
                   else [sp_prior_log2(width) + o for o in a["sp_offsets"]])
        return _sweep.sweep_curve(
            store, "lr", lambda seed: cfg_for(par, width, seed), initial, LR_LIMITS[par],
            extend=extend, key={"parametrization": par, "width": width, "multiplier": ""},
            seeds=seeds, log=log)

    # 1. the proxy's learning rate
    proxy_curve = lr_sweep("umup", args.proxy_width)
    proxy_lr = _sweep.optimum(proxy_curve)["best"]
    if proxy_lr is None:
        raise SystemExit("every u-muP run of the proxy's LR sweep diverged; widen --umup-lrs.")
    log(f"proxy LR: 2^{proxy_lr:g}")

    # 2. the independent search of each multiplier at the proxy LR
    base = [r for r in store.select(experiment="lr", parametrization="umup",
                                    width=args.proxy_width, multiplier="")
            if r["lr_log2"] == proxy_lr and r["seed"] in seeds]
    mult_curves, best = {}, {}
    for m in a["mults"]:
        def run_points(seed, todo, m=m):
            for v in todo:
                _sweep.run_group(store, "multipliers",
                                 cfg_for("umup", args.proxy_width, seed, {m: 2.0 ** v}),
                                 [proxy_lr], multiplier=m, multiplier_value=2.0 ** v, log=log)

        mult_curves[m] = _sweep.sweep_curve(
            store, "multipliers", None, a["values"], (-EXTEND_LIMIT, EXTEND_LIMIT),
            extend=extend, key={"parametrization": "umup", "width": args.proxy_width,
                                "multiplier": m, "lr_log2": proxy_lr},
            seeds=seeds, log=log, x="multiplier_value_log2", run_points=run_points,
            extra=[{**r, "multiplier": m, "multiplier_value": 1.0,
                    "multiplier_value_log2": 0.0} for r in base], step=1)
        best[m] = 2.0 ** _sweep.optimum(mult_curves[m], "multiplier_value_log2")["best"]
    label = combined_label(best)
    combined = {m: v for m, v in best.items() if v != 1.0}
    log(f"combined multipliers: {combined or 'all 1'}")

    # 3. every width: SP tuned, u-muP default tuned, u-muP transferred (proxy LR, combined)
    curves: dict = {arm: {} for arm in ARMS}
    for w in all_widths:
        curves["sp_tuned"][w] = lr_sweep("sp", w)
        curves["umup_default_tuned"][w] = lr_sweep("umup", w)

        def run_transfer(seed, todo, w=w):
            _sweep.run_group(store, "transfer", cfg_for("umup", w, seed, combined), todo,
                             multiplier=label, log=log)

        curves["umup_transferred"][w] = _sweep.sweep_curve(
            store, "transfer", None, [proxy_lr + o for o in a["offsets"]],
            LR_LIMITS["umup"], extend=False,
            key={"parametrization": "umup", "width": w, "multiplier": label}, seeds=seeds,
            log=log, run_points=run_transfer)

    n_params = {w: next(r["n_params"] for r in store.rows if r["width"] == w)
                for w in all_widths}
    summary, claims = summarise(curves, proxy_lr, n_params, a["widths"][-1])
    claims["proxy_lr_log2"] = proxy_lr
    claims["combined_multipliers"] = combined
    mult_summary = [{"multiplier": m, "best_value": best[m],
                     **{k: v for k, v in _sweep.optimum(c, "multiplier_value_log2").items()
                        if k in ("loss", "vertex", "bracketed", "n_runs")}}
                    for m, c in mult_curves.items()]
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    png = plot(curves, mult_curves, summary, out / f"{tag}.png", a["widths"][-1],
               title=f"u-μP workflow ({mode}): proxy width {args.proxy_width} (LR 2^"
                     f"{proxy_lr:g}, {label}), depth {args.depth}; {args.steps} steps x "
                     f"{args.batch_size} x {args.seq_len} tokens, {len(seeds)} seed(s)")
    store.write_meta(claims=claims, multiplier_search=mult_summary,
                     wall_s=round(time.perf_counter() - t0, 1),
                     finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    log(format_summary(summary))
    for k, c in claims.items():
        log(f"claim {k}: {c}")
    log(f"wrote {store.csv}, {out / f'{tag}_summary.csv'}, {png}, {store.meta_path}")
    return {"summary": summary, "claims": claims, "runs": store.rows, "png": str(png),
            "proxy_lr_log2": proxy_lr, "combined": combined, "mult_curves": mult_curves}


def _headline(arm: str, curve: list[dict], proxy_lr: float) -> Optional[dict]:
    """The point an arm is judged by: its optimum (tuned arms) or the proxy LR (transferred)."""
    if arm == "umup_transferred":
        return next((r for r in curve if r["lr_log2"] == proxy_lr), None)
    o = _sweep.optimum(curve)
    return next((r for r in curve if r["lr_log2"] == o["best"]), None)


def summarise(curves: dict, proxy_lr: float, n_params: dict, largest: int):
    """One row per width and arm; the claims (transferred u-muP against tuned SP and against
    tuned default u-muP, seed by seed)."""
    summary, heads = [], {}
    for arm, by_width in curves.items():
        for w in sorted(by_width):
            curve = by_width[w]
            o = _sweep.optimum(curve)
            h = _headline(arm, curve, proxy_lr)
            heads[(arm, w)] = h
            summary.append({
                "width": w, "n_params": n_params[w], "arm": arm,
                "lr_log2": None if h is None else h["lr_log2"],
                "val_loss": _sweep.score(h) if h else math.inf,
                "val_loss_std": None if h is None else h.get("val_loss_std"),
                "seed_losses": "" if h is None else "/".join(f"{v:.4f}"
                                                             for v in h["seed_losses"]),
                "best_lr_log2": o["best"], "best_val_loss": o["loss"],
                "vertex_lr_log2": o["vertex"], "bracketed": o["bracketed"],
                "n_lrs": o["n_runs"], "n_diverged": o["n_diverged"]})
    by = {(r["arm"], r["width"]): r for r in summary}
    for r in summary:
        sp = by.get(("sp_tuned", r["width"]))
        r["minus_sp_tuned"] = r["val_loss"] - sp["val_loss"] if sp else None

    def compare(arm: str, ref: str, w: int) -> dict:
        h, g = heads.get((arm, w)), heads.get((ref, w))
        if h is None or g is None:
            return {"holds": None}
        per_seed = [x - y for x, y in zip(h["seed_losses"], g["seed_losses"])]
        return {"width": w, arm: round(_sweep.score(h), 4), ref: round(_sweep.score(g), 4),
                "difference": round(_sweep.score(h) - _sweep.score(g), 4),
                "per_seed_differences": [round(d, 4) for d in per_seed],
                "holds": _sweep.score(h) <= _sweep.score(g),
                "holds_on_every_seed": all(d <= 0 for d in per_seed)}

    widths = sorted(curves["sp_tuned"])
    claims = {
        "transferred_umup_le_tuned_sp_at_largest_width":
            compare("umup_transferred", "sp_tuned", largest),
        "transferred_minus_tuned_sp_by_width": {
            w: compare("umup_transferred", "sp_tuned", w)["difference"] for w in widths},
        "transferred_minus_default_umup_tuned_by_width": {
            w: compare("umup_transferred", "umup_default_tuned", w)["difference"]
            for w in widths},
        "transferred_optimum_lr_log2_by_width": {
            w: _sweep.optimum(curves["umup_transferred"][w])["best"] for w in widths},
        "sp_optimum_lr_log2_by_width": {
            w: _sweep.optimum(curves["sp_tuned"][w])["best"] for w in widths},
        "umup_default_optimum_lr_log2_by_width": {
            w: _sweep.optimum(curves["umup_default_tuned"][w])["best"] for w in widths},
    }
    return summary, claims


def format_summary(summary: Sequence[dict]) -> str:
    lines = [f"{'width':>5} {'arm':20} {'log2 lr':>7} {'val loss':>9} {'- SP':>8}  per seed"]
    for r in sorted(summary, key=lambda r: (r["width"], ARMS.index(r["arm"]))):
        lr = "none" if r["lr_log2"] is None else f"{r['lr_log2']:g}"
        d = "" if r["minus_sp_tuned"] is None else f"{r['minus_sp_tuned']:+.4f}"
        lines.append(f"{r['width']:>5} {r['arm']:20} {lr:>7} {r['val_loss']:9.4f} {d:>8}  "
                     f"{r['seed_losses']}")
    return "\n".join(lines)


def plot(curves: dict, mult_curves: dict, summary: Sequence[dict], path: Path, largest: int,
         *, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    names = {"sp_tuned": "SP, LR tuned per width", "umup_default_tuned":
             "u-μP, multipliers 1, LR tuned per width", "umup_transferred":
             "u-μP, proxy's LR and multipliers"}
    for arm in ARMS:
        rs = sorted((r for r in summary if r["arm"] == arm and math.isfinite(r["val_loss"])),
                    key=lambda r: r["width"])
        axes[0].errorbar([r["width"] for r in rs], [r["val_loss"] for r in rs],
                         yerr=[r["val_loss_std"] or 0.0 for r in rs], fmt="o-", capsize=3,
                         label=names[arm])
    axes[0].set_xscale("log", base=2)
    axes[0].set_xlabel("width")
    axes[0].set_ylabel("validation loss (nats / byte)")
    axes[0].set_title("loss against width")
    for m, c in mult_curves.items():
        ok = [r for r in c if math.isfinite(_sweep.score(r))]
        axes[1].plot([r["multiplier_value_log2"] for r in ok], [r["val_loss"] for r in ok],
                     "o-", ms=4, label=m)
    axes[1].axvline(0, color="k", lw=0.5)
    axes[1].set_xlabel("log2 multiplier (the others at 1)")
    axes[1].set_title("proxy: independent multiplier search")
    for arm in ARMS:
        ok = [r for r in curves[arm][largest] if math.isfinite(_sweep.score(r))]
        axes[2].plot([r["lr_log2"] for r in ok], [r["val_loss"] for r in ok], "o-", ms=4,
                     label=names[arm])
    axes[2].set_xlabel("log2 learning rate")
    axes[2].set_title(f"width {largest}: loss against LR")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _sweep.save_figure(fig, path, title)


def estimate(args, a: dict, settings: dict, cfg_for, path: Path,
             log: Callable[[str], None]) -> dict:
    """Times every shape of the plan (initial grids; an extension adds groups) and writes the
    projected cost to ``path``."""
    n_seeds = len(a["seeds"])
    plan = [{"label": f"proxy multipliers (width {args.proxy_width})",
             "cfg": cfg_for("umup", args.proxy_width, 0), "lanes": 1,
             "groups": n_seeds * len(a["mults"]) * len(a["values"])}]
    for w in [args.proxy_width] + a["widths"]:
        plan += [{"label": f"sp width {w}", "cfg": cfg_for("sp", w, 0),
                  "lanes": len(a["sp_offsets"]), "groups": n_seeds},
                 {"label": f"umup default width {w}", "cfg": cfg_for("umup", w, 0),
                  "lanes": len(a["umup_lrs"]), "groups": n_seeds},
                 {"label": f"umup transferred width {w}", "cfg": cfg_for("umup", w, 0),
                  "lanes": len(a["offsets"]), "groups": n_seeds}]
    log(f"umup_workflow --estimate: timing {args.estimate_steps} steps of each shape")
    est = _sweep.estimate_cost(plan, steps=args.estimate_steps, log=log)
    est.update(settings=settings, seeds=a["seeds"], note="initial grids only: each "
               "extension of a grid adds a group of 2 lanes (LR) or 1 run (multiplier); "
               "validation passes not counted")
    return _sweep.write_estimate(path, est, log)


if __name__ == "__main__":
    main()
