"""The rule M ∝ B ∝ L (double the model, double the batch and the learning rate) against the
measured optima of u-muP and SP.

Reads results already on disk, trains nothing:

* the width-transfer optima -- ``lr_transfer_summary.csv`` (with ``lr_transfer_runs.csv`` for
  the parameter counts) and ``umup_workflow_summary.csv`` (its ``sp_tuned`` and
  ``umup_default_tuned`` arms: each tuned at every width); each curve's optimum is its
  parabola vertex (log2 LR), else its best grid point;
* the batch-size fits of ``batch_horizon_fits.csv`` (``log2 LR* = c + k_B log2 B``).

Per source and parametrization it fits ``log2 LR* = c + k_M log2 M`` (M the parameter count,
embedding included; ``_sweep.line_fit``, 95% interval from Student t) and says whether the
optimal LR **grows** with model size (the interval above 0), **shrinks** (below 0) or stays
**constant** (0 inside it). The rule's prediction is that doubling M and B together doubles
the optimal LR: ``k_M + k_B = 1``; the measured ``k_M + k_B`` (standard errors added in
quadrature, a normal 95% interval) is checked against it.

Outputs in ``--out``: ``scaling_rule.csv`` (one row per source and parametrization),
``scaling_rule.png`` (log2 LR* against log2 M with the fits) and ``scaling_rule_meta.json``
(the inputs read, the claims). ``--quick`` reads and writes the ``*_quick_*`` files of
``experiments/results/quick/`` (the other scripts' ``--quick`` outputs).

    python experiments/scaling_rule.py           # after lr_transfer / umup_workflow / batch_horizon
    python experiments/scaling_rule.py --quick   # after their --quick runs
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import _sweep

WIDTH_SOURCES = ("lr_transfer", "umup_workflow")
ARM_PARAMETRIZATION = {"sp_tuned": "sp", "umup_default_tuned": "umup"}
Z95 = 1.959964


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="read and write the *_quick files of "
                   "experiments/results/quick/")
    p.add_argument("--results", default=None, help="folder of the inputs (default "
                   "experiments/results/, or its quick/ with --quick)")
    p.add_argument("--width-sources", default=",".join(WIDTH_SOURCES), help="width-transfer "
                   "summaries to read (those missing are skipped; at least one must exist)")
    p.add_argument("--batch-source", default="batch_horizon", help="the batch fits' tag")
    p.add_argument("--out", default=None, help="output folder (default: --results)")
    p.add_argument("--tag", default=None)
    return p


def _read(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _opt(row: dict) -> Optional[float]:
    v = row.get("vertex_lr_log2") or row.get("best_lr_log2")
    return float(v) if v else None


def width_optima(results: Path, source: str, suffix: str) -> Optional[dict]:
    """``{parametrization: [(n_params, width, log2 LR*), ...]}`` of one width-transfer
    source, or None when its summary is not there."""
    path = results / f"{source}{suffix}_summary.csv"
    if not path.exists():
        return None
    rows = _read(path)
    out: dict = {}
    if source == "umup_workflow":
        for r in rows:
            par = ARM_PARAMETRIZATION.get(r["arm"])
            if par and _opt(r) is not None:
                out.setdefault(par, []).append((int(r["n_params"]), int(r["width"]), _opt(r)))
    else:
        runs = results / f"{source}{suffix}_runs.csv"
        if not runs.exists():
            raise SystemExit(f"{path} is there but {runs} is not: rerun {source}.py.")
        n_params = {(r["parametrization"], r["width"], r["depth"]): int(r["n_params"])
                    for r in _read(runs)}
        for r in rows:
            if r["parametrization"] in ("umup", "sp") and _opt(r) is not None:
                n = n_params[(r["parametrization"], r["width"], r["depth"])]
                out.setdefault(r["parametrization"], []).append((n, int(r["width"]), _opt(r)))
    return {p: sorted(v) for p, v in out.items()}


def verdict(lo: Optional[float], hi: Optional[float]) -> Optional[str]:
    """``grows`` / ``shrinks`` / ``constant`` from a 95% interval of a slope."""
    if lo is None or hi is None:
        return None
    return "grows" if lo > 0 else "shrinks" if hi < 0 else "constant"


def analyse(width: dict, batch: dict) -> tuple[list[dict], dict]:
    """Rows (per source and parametrization) and claims, from ``width_optima`` results
    (``{source: {par: points}}``) and the batch fits (``{par: fit row}``)."""
    rows, claims = [], {}
    for source, by_par in width.items():
        for par, pts in by_par.items():
            f = _sweep.line_fit([math.log2(n) for n, _, _ in pts], [y for _, _, y in pts])
            fw = _sweep.line_fit([math.log2(w) for _, w, _ in pts], [y for _, _, y in pts])
            b = batch.get(par) or {}
            k_b = float(b["k"]) if b.get("k") not in (None, "") else None
            se_b = float(b["k_se"]) if b.get("k_se") not in (None, "") else None
            row = {"source": source, "parametrization": par,
                   "widths": "/".join(str(w) for _, w, _ in pts),
                   "lr_log2_optima": "/".join(f"{y:.2f}" for _, _, y in pts),
                   "k_model": f["k"], "k_model_se": f["k_se"], "k_model_lo": f["k_lo"],
                   "k_model_hi": f["k_hi"], "k_width": fw["k"],
                   "lr_factor_per_model_doubling": None if f["k"] is None else 2.0 ** f["k"],
                   "lr_with_model_size": verdict(f["k_lo"], f["k_hi"]),
                   "k_batch": k_b, "k_batch_se": se_b}
            if f["k"] is not None and k_b is not None:
                s = f["k"] + k_b
                se = (math.hypot(f["k_se"], se_b) if f["k_se"] is not None and se_b is not None
                      else None)
                row.update(k_model_plus_batch=s, k_model_plus_batch_se=se,
                           lr_factor_doubling_model_and_batch=2.0 ** s,
                           rule_lr_doubles=(None if se is None
                                            else s - Z95 * se <= 1.0 <= s + Z95 * se))
            else:
                row.update(k_model_plus_batch=None, k_model_plus_batch_se=None,
                           lr_factor_doubling_model_and_batch=None, rule_lr_doubles=None)
            rows.append(row)
            claims[f"{source}_{par}"] = {
                "optimal_lr_with_model_size": row["lr_with_model_size"],
                "k_model": row["k_model"], "k_model_95": [row["k_model_lo"],
                                                          row["k_model_hi"]],
                "lr_factor_doubling_model_and_batch":
                    row["lr_factor_doubling_model_and_batch"],
                "consistent_with_M_B_L_rule": row["rule_lr_doubles"]}
    return rows, claims


def plot(width: dict, rows: Sequence[dict], path: Path, *, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(width), figsize=(6 * len(width), 4.5), squeeze=False)
    for ax, (source, by_par) in zip(axes[0], width.items()):
        for par, pts in by_par.items():
            c = "C0" if par == "umup" else "C1"
            xs = [math.log2(n) for n, _, _ in pts]
            ax.plot(xs, [y for _, _, y in pts], "o", color=c)
            r = next(r for r in rows if (r["source"], r["parametrization"]) == (source, par))
            if r["k_model"] is not None:
                f = _sweep.line_fit(xs, [y for _, _, y in pts])
                se = "" if r["k_model_se"] is None else f" ± {r['k_model_se']:.2f}"
                ax.plot([xs[0], xs[-1]], [f["c"] + f["k"] * x for x in (xs[0], xs[-1])], "-",
                        color=c, label=f"{'u-μP' if par == 'umup' else 'SP'}: k_M = "
                                       f"{r['k_model']:.2f}{se} ({r['lr_with_model_size']})")
        ax.set_xlabel("log2 parameters")
        ax.set_ylabel("log2 optimal LR")
        ax.set_title(source)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _sweep.save_figure(fig, path, title)


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    mode = "quick" if args.quick else "full"
    suffix = "_quick" if args.quick else ""
    results = _sweep.out_dir(argparse.Namespace(out=args.results), mode)
    sources = [s for s in args.width_sources.split(",") if s]
    bad = [s for s in sources if s not in WIDTH_SOURCES]
    if bad or not sources:
        raise SystemExit(f"--width-sources takes {', '.join(WIDTH_SOURCES)}, got "
                         f"{args.width_sources!r}")
    width = {s: w for s in sources if (w := width_optima(results, s, suffix))}
    if not width:
        names = ", ".join(f"{s}{suffix}_summary.csv" for s in sources)
        raise SystemExit(f"no width-transfer summary ({names}) in {results}: run "
                         "experiments/lr_transfer.py or umup_workflow.py"
                         + (" with --quick" if args.quick else "") + " first.")
    fits_path = results / f"{args.batch_source}{suffix}_fits.csv"
    if not fits_path.exists():
        raise SystemExit(f"no batch fits {fits_path}: run experiments/batch_horizon.py"
                         + (" --quick" if args.quick else "") + " first.")
    batch = {r["parametrization"]: r for r in _read(fits_path) if r["axis"] == "batch"}
    rows, claims = analyse(width, batch)
    out = Path(args.out) if args.out else results
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"scaling_rule{suffix}"
    _sweep.write_csv(out / f"{tag}.csv", rows)
    png = plot(width, rows, out / f"{tag}.png",
               title="optimal LR against model size (M ∝ B ∝ L predicts k_M + k_B = 1)")
    inputs = [str(results / f"{s}{suffix}_summary.csv") for s in width] + [str(fits_path)]
    meta = {"command": "python experiments/scaling_rule.py "
            + " ".join(shlex.quote(a) for a in argv), "inputs": inputs,
            "inputs_modified": {p: time.strftime("%Y-%m-%d %H:%M:%S",
                                                 time.localtime(Path(p).stat().st_mtime))
                                for p in inputs},
            "claims": claims, "written": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / f"{tag}_meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    for r in rows:
        k = "none" if r["k_model"] is None else f"{r['k_model']:+.3f}"
        se = "" if r["k_model_se"] is None else f" ± {r['k_model_se']:.3f}"
        both = ("" if r["lr_factor_doubling_model_and_batch"] is None else
                f"; doubling M and B: LR x {r['lr_factor_doubling_model_and_batch']:.2f} "
                f"(rule: x 2; consistent: {r['rule_lr_doubles']})")
        log(f"{r['source']:14} {r['parametrization']:5} optima 2^[{r['lr_log2_optima']}] at "
            f"widths {r['widths']}: k_M {k}{se} -> the optimal LR "
            f"{r['lr_with_model_size'] or '?'} with model size{both}")
    log(f"wrote {out / f'{tag}.csv'}, {png}, {out / f'{tag}_meta.json'}")
    return {"rows": rows, "claims": claims, "png": str(png)}


if __name__ == "__main__":
    main()
