"""Multi-task fine-tuning against single-task models on the same budget, per-task metric.

One u-muP encoder trained from scratch on SST-2 (accuracy) and WNUT-17 (entity F1) together
(``unitscale-jax finetune --task sst2=classify:DIR --task wnut17=tag:DIR``, the add rule on
the trunk's gradient, ``--task-sampling``), against one single-task model per task with the
same steps, batch size, learning rate and model. The data are the first ``--max-train`` /
``--max-dev`` examples of each task (``experiments/finetune.py``'s ``prepare_data``; its
WordPiece tokenizer trained on the SST-2 sentences).

Outputs in ``--out`` (default ``experiments/results/``, ``.../quick/`` for ``--quick``):
``<tag>_runs.csv`` (a row per run and task: the setting, the task, its best dev score and
loss), ``<tag>_curves.csv`` (every dev evaluation: setting, task, step, score), ``<tag>.png``
(the dev metric against the step, a panel per task) and ``<tag>_meta.json`` (settings,
command, machine, timings and the claims as computed: per task, the multi-task score minus
the single-task one). A rerun resumes each run from its checkpoint (a finished one at once);
``--fresh`` starts them over.
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
import finetune as ft

RUN_COLUMNS = ("setting", "task", "metric", "score", "dev_loss", "best_step", "steps",
               "batch_size", "n_train", "wall_s")

QUICK = {"width": 32, "depth": 1, "d_head": 8, "steps": 40, "eval_every": 20, "batch_size": 16,
         "seq_len": 32, "vocab_size": 500, "max_train": 512, "max_dev": 128}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (minutes on a 2-core "
                   "CPU); sizes from QUICK, writes <tag>_quick_* files under results/quick/")
    p.add_argument("--sst2", default=str(ft.SHARED / "sst2"), help="SST-2 directory")
    p.add_argument("--wnut17", default=str(ft.SHARED / "wnut17"), help="WNUT-17 directory")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--d-head", type=int, default=16)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--max-train", type=int, default=0, help="examples per task (0: all)")
    p.add_argument("--max-dev", type=int, default=0, help="dev examples per task (0: all)")
    p.add_argument("--lr-log2", type=float, default=0.0, help="log2 of the u-muP learning rate")
    p.add_argument("--sampling", default="proportional",
                   help="--task-sampling of the multi-task run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--fresh", action="store_true", help="start every run over (default: a "
                   "rerun resumes each run from its checkpoint, a finished one at once)")
    return p


def _flags(args, prepared: dict, run_dir: Path) -> list[str]:
    return [*ft._model_flags(args, "umup", args.width), "--tokenizer", prepared["tokenizer"],
            "--steps", str(args.steps), "--eval-every", str(args.eval_every),
            "--lr", repr(2.0 ** args.lr_log2), "--run-dir", str(run_dir),
            "--keep-checkpoints", "1", *(["--overwrite"] if args.fresh else [])]


SETTINGS = (*(f"single_{t}" for t in ft.TASKS), "multi")
"""The runs: one per task alone, and the multi-task one."""


def _tasks(setting: str) -> list[str]:
    """The tasks a run (one of ``SETTINGS``) trains."""
    return list(ft.TASKS) if setting == "multi" else [setting.removeprefix("single_")]


def _metric_key(setting: str, task: str) -> str:
    """The name of ``task``'s dev metric in the run's metrics and summary."""
    metric = ft.TASKS[task][1]
    return f"{task}_{metric}" if setting == "multi" else metric


def run_setting(args, prepared: dict, work: Path, setting: str) -> list[dict]:
    """One run (``single_<task>`` or ``multi``): a row per task it trains."""
    from unitscale_jax.train.finetune import finetune
    from unitscale_jax.train.flags import parse_finetune_args
    tasks = _tasks(setting)
    run_dir = work / setting
    if setting == "multi":
        flags = [a for t in tasks for a in
                 ("--task", f"{t}={ft.TASKS[t][0]}:{prepared['tasks'][t]['dir']}")]
        flags += ["--task-sampling", args.sampling]
    else:
        flags = ["--task", ft.TASKS[tasks[0]][0], "--data", prepared["tasks"][tasks[0]]["dir"]]
    t0 = time.perf_counter()
    s = finetune(parse_finetune_args([*flags, *_flags(args, prepared, run_dir)]), quiet=True)
    wall = round(time.perf_counter() - t0, 2)
    rows = []
    for t in tasks:
        metric, key = ft.TASKS[t][1], _metric_key(setting, t)
        report = json.loads((run_dir / (f"dev_report_{t}.json" if setting == "multi" else
                                        "dev_report.json")).read_text())
        value = (s.get("best_dev") or {}).get(key, math.nan)
        rows.append({"setting": "multi" if setting == "multi" else "single", "task": t,
                     "metric": metric, "score": value, "dev_loss": report["loss"],
                     "best_step": s.get("best_step"), "steps": args.steps,
                     "batch_size": args.batch_size,
                     "n_train": prepared["tasks"][t]["n_train"], "wall_s": wall})
    return rows


def curves(work: Path) -> list[dict]:
    """Every dev evaluation of every run: a row per (setting, task, step) with its score
    (the runs' ``metrics.jsonl``)."""
    rows = []
    for setting in SETTINGS:
        for line in (work / setting / "metrics.jsonl").read_text().splitlines():
            m = json.loads(line)
            if m.get("split") != "validation":
                continue
            for t in _tasks(setting):
                if _metric_key(setting, t) in m:
                    rows.append({"setting": "multi" if setting == "multi" else "single",
                                 "task": t, "metric": ft.TASKS[t][1], "step": m["step"],
                                 "score": m[_metric_key(setting, t)]})
    return rows


def plot(rows: Sequence[dict], path: Path, title: str) -> Path:
    """The dev metric against the step, a panel per task, single- and multi-task runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(ft.TASKS), figsize=(5 * len(ft.TASKS), 3.6),
                             squeeze=False)
    for ax, (t, (_, metric)) in zip(axes[0], ft.TASKS.items()):
        for setting, style in (("single", "s--"), ("multi", "o-")):
            rs = sorted((r for r in rows if (r["setting"], r["task"]) == (setting, t)),
                        key=lambda r: r["step"])
            ax.plot([r["step"] for r in rs], [r["score"] for r in rs], style, ms=3,
                    label=f"{setting}-task")
        ax.set_title(f"{t} (dev {metric})")
        ax.set_xlabel("step (all tasks together)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _sweep.save_figure(fig, path, title, fontsize=9)


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    args = build_parser().parse_args(argv)
    mode = _sweep.apply_quick(args, argv, QUICK)
    if args.width % args.d_head:
        raise SystemExit(f"--width {args.width} must be a multiple of --d-head {args.d_head}")
    tag = args.tag or ("multitask" if mode == "full" else "multitask_quick")
    out = _sweep.out_dir(args, mode)
    work = out / f"{tag}_work"
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prepared = ft.prepare_data(args, work, list(ft.TASKS))
    rows = []
    for setting in SETTINGS:
        log(f"{setting} ...")
        rows += run_setting(args, prepared, work, setting)
    _sweep.write_csv(out / f"{tag}_runs.csv", [{k: r[k] for k in RUN_COLUMNS} for r in rows])
    curve_rows = curves(work)
    _sweep.write_csv(out / f"{tag}_curves.csv", curve_rows)
    plot(curve_rows, out / f"{tag}.png",
         title=f"multi-task vs single-task ({mode}): width {args.width}, depth {args.depth}, "
         f"{args.steps} steps x {args.batch_size} each, sampling {args.sampling}")
    by = {(r["setting"], r["task"]): r["score"] for r in rows}
    claims = {t: {"single": by[("single", t)], "multi": by[("multi", t)],
                  "multi_minus_single": by[("multi", t)] - by[("single", t)]}
              for t in ft.TASKS}
    meta = {"settings": {**{k: v for k, v in vars(args).items() if k not in ("out", "tag")},
                         "mode": mode},
            "command": "python experiments/multitask.py " + shlex.join(sys.argv[1:]),
            "machine": _sweep.machine(), "wall_s": round(time.perf_counter() - t0, 2),
            "claims": claims}
    (out / f"{tag}_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for t, c in claims.items():
        log(f"{t}: single {c['single']:.4f}, multi {c['multi']:.4f} "
            f"({c['multi_minus_single']:+.4f})")
    return meta


if __name__ == "__main__":
    main()
