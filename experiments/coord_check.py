"""The coordinate check of Tensor Programs V, quantitatively: u-muP, muP and SP.

Yang et al. (arXiv 2203.03466, section 8 and appendix D.1) validate a muP implementation by
training models of growing width for a few Adam steps at a high learning rate and plotting
the mean absolute value per coordinate ("l1") of every module's output against width: flat
curves at every step mean a width-independent update, curves rising with width mean that
the activations blow up as the model widens. This script runs that check with
``unitscale_jax.analysis.coord_check`` (unrolled 2-layer decoders of width 2^6 ... 2^11 with
``width / 16`` heads, vocabulary 256, a fixed batch of 8 x 32 random tokens memorised for 5
Adam steps) and puts a number on each curve: ``width_ratios``, the largest over the smallest
value across the widths per module and parametrization, and the slope of ``log2`` value
against ``log2`` width.

Optimizers (``coord.default_optimizer``) and learning rates (``coord.LEARNING_RATES``, high
on purpose): u-muP with ``unitscale_jax.optim.adam`` at 2^1, muP with
``unitscale_jax.optim.mup_adam`` (hidden weights at ``64 / fan_in`` of the learning rate) at
2^-5, SP with ``optax.adam`` at 2^-6; SP's weights start at std ``fan_in^-1/2``, so every
parametrization starts (nearly) flat and what grows comes from training.

The claim tested: at the last step every module's ratio is at most ``--bound`` (2) for u-muP
and muP, while SP's hidden modules (the layers' outputs, norms aside) grow with width.

Outputs in ``--out`` (default ``experiments/results/``, ``.../quick/`` for ``--quick``):
``<tag>.csv`` (every record: parametrization, width, step, module, mean |x|, RMS, loss),
``<tag>_summary.csv`` (``width_ratios`` per parametrization, step and module, with whether
the ratio is within the bound), ``<tag>.png`` (TP5's figure: mean |x| against width, a panel
per parametrization and module, a line per step) and ``<tag>_meta.json`` (settings, command,
machine, timings per model, the claims as computed).

    python experiments/coord_check.py            # widths 64 ... 2048
    python experiments/coord_check.py --quick    # widths 32 ... 256, one layer
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from unitscale_jax.analysis import coord  # noqa: E402
from unitscale_jax.nn import TransformerConfig  # noqa: E402

QUICK = {"widths": "32,64,128,256", "n_layers": 1}
PARAMETRIZATIONS = ("umup", "mup", "sp")
STAT_LABELS = {"mean_abs": "mean |activation|", "rms": "activation RMS"}
PLOTTED = ("embed", "attn.q", "attn.proj", "mlp.act", "mlp.out", "logits")
"""Modules of the figure (the first layer's attention, the last layer's MLP)."""


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (minutes on a 2-core "
                   "CPU): sizes from QUICK, coord_check_quick_* files under results/quick/")
    p.add_argument("--parametrizations", default=",".join(PARAMETRIZATIONS))
    p.add_argument("--widths", default=",".join(str(w) for w in coord.WIDTHS),
                   help="comma-separated widths (d_model)")
    p.add_argument("--steps", type=int, default=coord.STEPS, help="Adam steps")
    p.add_argument("--lr", action="append", default=[], metavar="PAR=LR",
                   help="learning rate of a parametrization (default coord.LEARNING_RATES)")
    p.add_argument("--n-layers", type=int, default=2)
    p.add_argument("--d-head", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stat", default="mean_abs", choices=coord.STATS,
                   help="statistic of the ratios and the figure")
    p.add_argument("--bound", type=float, default=2.0, help="the claim's bound on the ratio")
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None, help="file name prefix of the outputs")
    return p


def learning_rates(items: Sequence[str], pars: Sequence[str]) -> dict:
    """``["mup=0.05"]`` -> ``{"umup": 2.0, "mup": 0.05, "sp": 2^-6}`` (for ``pars``)."""
    lrs = dict(coord.LEARNING_RATES)
    for item in items:
        name, _, value = item.partition("=")
        try:
            lr = float(value)
        except ValueError:
            lr = float("nan")
        if name not in pars or not lr > 0:
            raise SystemExit(f"--lr takes PAR=LR with PAR one of {list(pars)} and LR > 0, "
                             f"got {item!r}")
        lrs[name] = lr
    return {p: lrs[p] for p in pars}


def is_hidden(name: str) -> bool:
    """A layer's output other than a norm's (norm outputs are flat by construction)."""
    return name.startswith("L") and "." in name and not name.endswith("norm")


def summarise(records: Sequence[dict], stat: str, bound: float) -> list[dict]:
    """``width_ratios`` at every step, with ``within_bound``."""
    steps = sorted({int(r["step"]) for r in records})
    return [{**r, "stat": stat, "within_bound": r["ratio"] <= bound}
            for t in steps for r in coord.width_ratios(records, step=t, stat=stat)]


def claims(summary: Sequence[dict], bound: float) -> dict:
    """The claim at the last step: u-muP's and muP's ratios within ``bound``, SP's hidden
    modules growing with width."""
    last = max(r["step"] for r in summary)
    out = {"step": last, "bound": bound}
    for p in dict.fromkeys(r["parametrization"] for r in summary):
        rs = [r for r in summary if r["parametrization"] == p and r["step"] == last]
        hidden = [r for r in rs if is_hidden(r["name"])]
        worst = max(rs, key=lambda r: r["ratio"])
        c = {"max_ratio": worst["ratio"], "max_ratio_module": worst["name"],
             "modules": len(rs), "modules_over_bound": [r["name"] for r in rs
                                                       if r["ratio"] > bound],
             "hidden_modules": len(hidden),
             "hidden_max_ratio": max((r["ratio"] for r in hidden), default=float("nan")),
             "hidden_growing": sum(r["slope"] > 0 for r in hidden),
             "hidden_over_bound": sum(r["ratio"] > bound for r in hidden)}
        if p == "sp":
            c["claim_hidden_grow"] = bool(hidden) and c["hidden_growing"] == len(hidden)
        else:
            c["claim_within_bound"] = not c["modules_over_bound"]
        out[p] = c
    return out


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    args = build_parser().parse_args(argv)
    mode = _sweep.apply_quick(args, argv, QUICK)
    pars = _sweep.parametrizations(args.parametrizations, PARAMETRIZATIONS)
    widths = _sweep.int_list(args.widths)
    lrs = learning_rates(args.lr, pars)
    if len(widths) < 2 or min(widths) < 1 or any(w % args.d_head for w in widths):
        raise SystemExit(f"--widths needs two or more positive multiples of --d-head "
                         f"{args.d_head}, got {args.widths!r}")
    if args.steps < 1:
        raise SystemExit(f"--steps must be >= 1, got {args.steps}")
    tag = args.tag or ("coord_check" if mode == "full" else "coord_check_quick")
    out = _sweep.out_dir(args, mode)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "tag", "quick")}
    meta = {"settings": {**settings, "mode": mode, "widths": widths, "learning_rates": lrs},
            "command": "python experiments/coord_check.py " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "machine": _sweep.machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    config = TransformerConfig(vocab_size=args.vocab_size, d_model=min(widths),
                               n_layers=args.n_layers, n_heads=1, max_seq_len=args.seq_len,
                               sp_init_std=None)
    log(f"coord_check ({mode}): {', '.join(pars)} at widths {widths}, {args.steps} steps, "
        f"{args.n_layers} layers, batch {args.batch_size} x {args.seq_len}, lr {lrs}")
    t0 = time.perf_counter()
    records, timings = [], []
    for p in pars:
        for w in widths:
            t = time.perf_counter()
            records += coord.coord_check((p,), (w,), args.steps, learning_rates=lrs,
                                         batch_size=args.batch_size, seq_len=args.seq_len,
                                         config=config, d_head=args.d_head, seed=args.seed,
                                         progress=log)
            timings.append({"parametrization": p, "width": w,
                            "seconds": round(time.perf_counter() - t, 1)})
    summary = summarise(records, args.stat, args.bound)
    result = claims(summary, args.bound)
    _sweep.write_csv(out / f"{tag}.csv", records)
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    names = list(dict.fromkeys(r["name"] for r in records))
    last_layer = f"L{args.n_layers - 1}."
    plotted = [n for n in names if n in ("embed", "logits")
               or (n.startswith("L0.attn.") and n.endswith(PLOTTED))
               or (n.startswith(last_layer + "mlp.") and n.endswith(PLOTTED))]
    png = coord.plot_coord_check(
        records, str(out / f"{tag}.png"), names=plotted, stat=args.stat, lines="step",
        title=f"Coordinate check ({mode}): {STAT_LABELS[args.stat]} vs width after t Adam "
              f"steps, {args.n_layers}-layer decoder, d_head {args.d_head}")
    meta.update(claims=result, timings=timings, wall_s=round(time.perf_counter() - t0, 1),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    meta_path = out / f"{tag}_meta.json"
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    log(coord.ratio_table([r for r in summary if r["step"] == result["step"]], args.stat))
    for p in pars:
        c = result[p]
        verdict = (f"hidden modules growing {c['hidden_growing']}/{c['hidden_modules']}"
                   if p == "sp" else
                   f"within {args.bound:g}: {c['claim_within_bound']}"
                   + (f" (over: {', '.join(c['modules_over_bound'])})"
                      if c["modules_over_bound"] else ""))
        log(f"{p:4s} step {result['step']}: max ratio {c['max_ratio']:.2f} "
            f"({c['max_ratio_module']}); {verdict}")
    log(f"wrote {out}/{tag}.csv, _summary.csv, .png, _meta.json in {meta['wall_s']:.0f} s")
    return {"records": records, "summary": summary, "claims": result, "png": png,
            "meta": str(meta_path)}


if __name__ == "__main__":
    main()
