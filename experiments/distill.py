"""Distillation: a narrow decoder distilled from a wide one vs the same decoder trained alone.

For u-muP and SP: a teacher decoder at ``--teacher-width`` trained on the built-in corpus (or
``--data``), then at each seed of ``--seeds`` a student at ``--student-width`` trained twice
for the same steps on the same rows (the same seed: the same init and data order): alone
(cross-entropy) and with ``--distill-from`` the teacher (``a T^2 KL + (1 - a) CE``, weight
``--weight``, temperature ``--temperature``). The claim: the distilled student's validation
loss (the labels' cross-entropy) is lower than the student's alone, at every seed.

Every run goes through the library's own commands (``train.run`` on parsed ``train`` flags),
each into its run directory under ``<out>/<tag>_work``.

Outputs in ``--out`` (default ``experiments/results/``, ``.../quick/`` for ``--quick``):
``<tag>_runs.csv`` (a row per run, appended as each finishes; a rerun with the same settings
resumes), ``<tag>_summary.csv`` (per parametrization: mean validation loss alone and
distilled, wins), ``<tag>.png`` (validation loss per seed) and ``<tag>_meta.json`` (settings,
command, machine, timings, the claims as computed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import _sweep
from finetune import Table

RUN_COLUMNS = ("parametrization", "role", "seed", "width", "steps", "val_loss", "train_loss",
               "wall_s")
QUICK = {"teacher_width": 32, "student_width": 16, "depth": 1, "d_head": 8,
         "teacher_steps": 40, "steps": 20, "seeds": "0,1", "batch_size": 8, "seq_len": 32,
         "eval_every": 20}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (minutes on a 2-core "
                   "CPU); sizes from QUICK, writes <tag>_quick_* files under results/quick/")
    p.add_argument("--data", default=None, help="training text (default: the built-in corpus)")
    p.add_argument("--parametrizations", default="umup,sp")
    p.add_argument("--teacher-width", type=int, default=128)
    p.add_argument("--student-width", type=int, default=32)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--d-head", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1000, help="student steps (both students)")
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--student-lr-log2", type=float, default=None, help="log2 of both "
                   "students' learning rate (default: the parametrization's default, as the "
                   "teacher's)")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--weight", type=float, default=0.5, help="distillation weight a")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--fresh", action="store_true", help="start over (default: resume when "
                   "the settings match)")
    return p


def _flags(args, par: str, width: int, seed: int, steps: int, run_dir: Path) -> list[str]:
    data = ["--data", args.data] if args.data else []
    return ["--model", "decoder", "--parametrization", par, "--d-model", str(width),
            "--n-layers", str(args.depth), "--n-heads", str(width // args.d_head),
            "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
            "--seed", str(seed), "--steps", str(steps), "--eval-every", str(args.eval_every),
            "--keep-checkpoints", "1", "--no-progress", "--no-tensorboard", "--no-plot",
            "--run-dir", str(run_dir), *data]


def one_run(args, work: Path, par: str, role: str, seed: int) -> dict:
    from unitscale_jax.train import run as train_run
    from unitscale_jax.train.flags import parse_train_args
    teacher = role == "teacher"
    width = args.teacher_width if teacher else args.student_width
    steps = args.teacher_steps if teacher else args.steps
    run_dir = work / (f"teacher_{par}" if teacher else f"{role}_{par}_{seed}")
    flags = _flags(args, par, width, seed, steps, run_dir)
    if not teacher and args.student_lr_log2 is not None:
        flags += ["--lr", repr(2.0 ** args.student_lr_log2)]
    if role == "distilled":
        flags += ["--distill-from", str(work / f"teacher_{par}"), "--distill-temperature",
                  repr(args.temperature), "--distill-weight", repr(args.weight)]
    t0 = time.perf_counter()
    s = train_run(parse_train_args(flags), quiet=True)
    return {"parametrization": par, "role": role, "seed": seed, "width": width, "steps": steps,
            "val_loss": s["final_val_loss"], "train_loss": s["final_train_loss"],
            "wall_s": round(time.perf_counter() - t0, 2)}


def summarise(rows: Sequence[dict]) -> tuple[list[dict], dict]:
    """Per parametrization: the mean validation loss of the students alone and distilled, the
    seeds where distillation is lower, and the teacher's."""
    summary, claims = [], {}
    for par in sorted({r["parametrization"] for r in rows}):
        mine = [r for r in rows if r["parametrization"] == par]
        by = {role: {int(r["seed"]): float(r["val_loss"]) for r in mine if r["role"] == role}
              for role in ("alone", "distilled")}
        seeds = sorted(set(by["alone"]) & set(by["distilled"]))
        teacher = [float(r["val_loss"]) for r in mine if r["role"] == "teacher"]
        wins = [s for s in seeds if by["distilled"][s] < by["alone"][s]]
        mean = {k: (sum(by[k][s] for s in seeds) / len(seeds) if seeds else None)
                for k in by}
        summary.append({"parametrization": par, "teacher_val_loss": teacher[0] if teacher
                        else None, "alone_mean_val_loss": mean["alone"],
                        "distilled_mean_val_loss": mean["distilled"], "n_seeds": len(seeds),
                        "distilled_lower_seeds": len(wins)})
        claims[f"{par}_distilled_lower_at_every_seed"] = bool(seeds) and len(wins) == len(seeds)
        claims[f"{par}_gain_by_seed"] = {s: by["alone"][s] - by["distilled"][s] for s in seeds}
    return summary, claims


def plot(rows: Sequence[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pars = [p for p in ("umup", "sp") if any(r["parametrization"] == p for r in rows)]
    fig, axes = plt.subplots(1, max(1, len(pars)), figsize=(5 * max(1, len(pars)), 3.6),
                             squeeze=False)
    for ax, par in zip(axes[0], pars):
        for role, style in (("alone", "s--"), ("distilled", "o-")):
            rs = sorted((r for r in rows if (r["parametrization"], r["role"]) == (par, role)),
                        key=lambda r: int(r["seed"]))
            ax.plot([int(r["seed"]) for r in rs], [float(r["val_loss"]) for r in rs], style,
                    label=f"student {role}")
        for r in rows:
            if (r["parametrization"], r["role"]) == (par, "teacher"):
                ax.axhline(float(r["val_loss"]), color="gray", lw=0.8,
                           label=f"teacher (width {r['width']})")
        ax.set_title("u-μP" if par == "umup" else "SP")
        ax.set_xlabel("seed")
        ax.set_ylabel("validation loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _sweep.save_figure(fig, path, title, fontsize=9)


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    args = build_parser().parse_args(argv)
    mode = _sweep.apply_quick(args, argv, QUICK)
    pars = _sweep.parametrizations(args.parametrizations)
    if any(w % args.d_head for w in (args.teacher_width, args.student_width)):
        raise SystemExit(f"the widths must be multiples of --d-head {args.d_head}")
    seeds = _sweep.int_list(args.seeds)
    tag = args.tag or ("distill" if mode == "full" else "distill_quick")
    out = _sweep.out_dir(args, mode)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "tag", "fresh", "quick")}
    settings["mode"] = mode
    meta_path = out / f"{tag}_meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    resume = not args.fresh and old is not None and old.get("settings") == settings
    work = out / f"{tag}_work"
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    meta = {**(old if resume else {}), "settings": settings,
            "command": "python experiments/distill.py " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "machine": _sweep.machine(), "started": (old or {}).get("started") if resume
            else time.strftime("%Y-%m-%d %H:%M:%S"), "runs_this_call": 0}
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    t0 = time.perf_counter()
    log(f"distill ({mode}): teacher width {args.teacher_width} ({args.teacher_steps} steps), "
        f"student width {args.student_width} ({args.steps} steps), depth {args.depth}, batch "
        f"{args.batch_size} x seq {args.seq_len}, T {args.temperature:g}, a {args.weight:g}, "
        f"seeds {seeds}")
    runs = Table(out / f"{tag}_runs.csv", RUN_COLUMNS, resume)
    todo = [(par, "teacher", 0) for par in pars] + [
        (par, role, s) for par in pars for s in seeds for role in ("alone", "distilled")]
    for par, role, seed in todo:
        if runs.has(parametrization=par, role=role, seed=seed):
            continue
        row = one_run(args, work, par, role, seed)
        runs.add(row)
        meta["runs_this_call"] += 1
        log(f"  {par} {role} seed {seed}: val loss {row['val_loss']:.4f} "
            f"({row['wall_s']:.0f} s)")
    summary, claims = summarise(runs.rows)
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    png = plot(runs.rows, out / f"{tag}.png",
               title=f"distillation ({mode}): width {args.student_width} student from width "
               f"{args.teacher_width} teacher, {args.steps} steps x {args.batch_size}, "
               f"T {args.temperature:g}, a {args.weight:g}")
    meta.update(claims=claims, wall_s=round(time.perf_counter() - t0, 1),
                finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                runs_s=sum(float(r["wall_s"]) for r in runs.rows))
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    for s in summary:
        log(f"{s['parametrization']:4s} alone {s['alone_mean_val_loss']} distilled "
            f"{s['distilled_mean_val_loss']} (lower at {s['distilled_lower_seeds']}/"
            f"{s['n_seeds']} seeds)")
    for k, c in claims.items():
        log(f"claim {k}: {c}")
    return {"summary": summary, "claims": claims, "runs": runs.rows, "png": str(png),
            "meta": str(meta_path)}


if __name__ == "__main__":
    main()
