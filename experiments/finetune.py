"""Pretrain -> fine-tune: u-muP vs SP encoders on SST-2 and WNUT-17, pretrained vs from scratch.

1. A WordPiece tokenizer trained on the SST-2 training sentences; u-muP and SP encoders
   pretrained with masked-LM on the same sentences (``unitscale-jax train --model encoder``),
   at each width of ``--widths`` (fixed depth, head width and token budget), each at its
   parametrization's pretraining learning rate.
2. Each of them fine-tuned (``unitscale-jax finetune``) on SST-2 (dev accuracy) and WNUT-17
   (dev entity F1, seqeval strict IOB2) at fine-tuning learning rates over powers of 2, and the
   same architectures trained on the task from scratch at the same learning rates.

Every run goes through the library's own commands (``train.run``, ``train.finetune.finetune``
on the parsed command-line flags), each into its run directory under ``<out>/<tag>_work``.

Outputs in ``--out`` (default ``experiments/results/``, ``.../quick/`` for ``--quick``):
``<tag>_pretrain.csv`` (a row per pretrained encoder), ``<tag>_runs.csv`` (a row per
fine-tuning run, appended as each finishes; a rerun with the same settings resumes),
``<tag>_summary.csv`` (per task, parametrization, width and init: the best LR and its score),
``<tag>.png`` (dev score against log2 LR, a panel per task and parametrization) and
``<tag>_meta.json`` (settings, command, machine, timings, the claims as computed).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import _sweep

SHARED = _sweep.REPO.parent / "shared" / "data"
TASKS = {"sst2": ("classify", "accuracy"), "wnut17": ("tag", "f1")}
INITS = ("pretrained", "scratch")
RUN_COLUMNS = ("task", "parametrization", "width", "init", "lr_log2", "lr", "metric", "score",
               "dev_loss", "best_step", "steps", "batch_size", "seq_len", "n_train", "wall_s")
PRE_COLUMNS = ("parametrization", "width", "lr_log2", "steps", "val_loss", "wall_s")

QUICK = {"widths": "16,32", "depth": 1, "d_head": 8, "pretrain_steps": 30, "finetune_steps": 20,
         "eval_every": 10, "batch_size": 16, "seq_len": 32, "vocab_size": 500,
         "max_train": 512, "max_dev": 128, "umup_lrs": "-2,0", "sp_lrs": "-8,-6"}


FINETUNE_SETTINGS = ("tasks", "finetune_steps", "eval_every", "max_dev", "umup_lrs", "sp_lrs")
"""Settings that change only the fine-tuning runs: a rerun that changes only these keeps the
pretrained encoders (and starts the fine-tuning runs over)."""


def _pretrain_settings(settings: dict) -> dict:
    return {k: v for k, v in settings.items() if k not in FINETUNE_SETTINGS}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (minutes on a 2-core "
                   "CPU); sizes from QUICK, writes <tag>_quick_* files under results/quick/")
    p.add_argument("--sst2", default=str(SHARED / "sst2"), help="SST-2 directory (train.tsv, "
                   "dev.tsv)")
    p.add_argument("--wnut17", default=str(SHARED / "wnut17"), help="WNUT-17 directory "
                   "(train.conll, dev.conll)")
    p.add_argument("--tasks", default="sst2,wnut17")
    p.add_argument("--parametrizations", default="umup,sp")
    p.add_argument("--widths", default="32,64,128")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--d-head", type=int, default=16)
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--pretrain-lr-umup", type=float, default=-1, help="log2 pretraining LR")
    p.add_argument("--pretrain-lr-sp", type=float, default=-8, help="log2 pretraining LR")
    p.add_argument("--finetune-steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--max-train", type=int, default=0, help="training examples (sentences) "
                   "per task, the first ones (0: all)")
    p.add_argument("--max-dev", type=int, default=0, help="dev examples per task (0: all)")
    p.add_argument("--umup-lrs", default="-4:1", help="u-muP's log2 fine-tuning LRs (a:b or "
                   "comma-separated)")
    p.add_argument("--sp-lrs", default="-12:-5", help="SP's log2 fine-tuning LRs")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new "
                   "fine-tuning runs in this call (0: only write the summary and plot of the "
                   "rows so far); rerun to continue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--fresh", action="store_true", help="start over (default: resume when "
                   "the settings match)")
    return p


# --------------------------------------------------------------------------- data


def _subset_tsv(src: Path, dst: Path, n: int) -> int:
    lines = src.read_text(encoding="utf-8").splitlines()
    body = lines[1:] if not n else lines[1:1 + n]
    dst.write_text("\n".join([lines[0], *body]) + "\n", encoding="utf-8")
    return len(body)


def _subset_conll(src: Path, dst: Path, n: int) -> int:
    blocks = [b for b in src.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    blocks = blocks if not n else blocks[:n]
    dst.write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    return len(blocks)


def prepare_data(args, work: Path, tasks: Sequence[str]) -> dict:
    """Task -> its data directory under ``work`` (the first ``--max-train`` / ``--max-dev``
    examples of the given files), plus the pretraining corpus and the tokenizer."""
    from unitscale_jax import data
    sources = {"sst2": (Path(args.sst2), "tsv", _subset_tsv),
               "wnut17": (Path(args.wnut17), "conll", _subset_conll)}
    out = {}
    for task in tasks:
        src, ext, subset = sources[task]
        for split in ("train", "dev"):
            if not (src / f"{split}.{ext}").is_file():
                raise SystemExit(f"no {src / f'{split}.{ext}'}; pass --{task} DIR holding "
                                 f"train.{ext} and dev.{ext}.")
        dst = work / "data" / task
        dst.mkdir(parents=True, exist_ok=True)
        n = {split: subset(src / f"{split}.{ext}", dst / f"{split}.{ext}",
                           args.max_train if split == "train" else args.max_dev)
             for split in ("train", "dev")}
        out[task] = {"dir": str(dst), "n_train": n["train"], "n_dev": n["dev"]}
    # pretraining text: the SST-2 training sentences (all of them, or --max-train)
    sentences = Path(args.sst2) / "train.tsv"
    if not sentences.is_file():
        raise SystemExit(f"no {sentences}; pass --sst2 DIR (its sentences are the "
                         "pretraining corpus).")
    rows = sentences.read_text(encoding="utf-8").splitlines()[1:]
    rows = rows if not args.max_train else rows[:args.max_train]
    corpus = work / "sentences.txt"
    corpus.write_text("\n".join(r.split("\t")[0] for r in rows) + "\n", encoding="utf-8")
    tok = work / "tok.json"
    if not tok.is_file():
        data.train_tokenizer([str(corpus)], kind="wordpiece", vocab_size=args.vocab_size,
                             out_path=str(tok))
    return {"tasks": out, "corpus": str(corpus), "tokenizer": f"hf:{tok}",
            "corpus_lines": len(rows)}


# --------------------------------------------------------------------------- runs


def _model_flags(args, par: str, width: int) -> list[str]:
    return ["--parametrization", par, "--d-model", str(width), "--n-layers", str(args.depth),
            "--n-heads", str(width // args.d_head), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--no-progress",
            "--no-tensorboard", "--no-plot"]


def pretrain(args, prepared: dict, work: Path, par: str, width: int) -> dict:
    from unitscale_jax.train import run as train_run
    from unitscale_jax.train.flags import parse_train_args
    lr_log2 = args.pretrain_lr_umup if par == "umup" else args.pretrain_lr_sp
    run_dir = work / f"pre_{par}_{width}"
    t0 = time.perf_counter()
    cfg = parse_train_args(["--model", "encoder", *_model_flags(args, par, width),
                            "--tokenizer", prepared["tokenizer"], "--data", prepared["corpus"],
                            "--data-dir", str(work / "tfds"), "--steps",
                            str(args.pretrain_steps), "--eval-every",
                            str(args.pretrain_steps), "--lr", repr(2.0 ** lr_log2),
                            "--run-dir", str(run_dir)])
    s = train_run(cfg, quiet=True)
    return {"parametrization": par, "width": width, "lr_log2": lr_log2,
            "steps": args.pretrain_steps, "val_loss": s["final_val_loss"],
            "wall_s": round(time.perf_counter() - t0, 2), "run_dir": str(run_dir)}


def finetune_one(args, prepared: dict, work: Path, task: str, par: str, width: int, init: str,
                 lr_log2: float) -> dict:
    from unitscale_jax.train.finetune import finetune
    from unitscale_jax.train.flags import parse_finetune_args
    kind, metric = TASKS[task]
    run_dir = work / f"ft_{task}_{par}_{width}_{init}_{lr_log2:g}"
    flags = ["--task", kind, "--data", prepared["tasks"][task]["dir"],
             *_model_flags(args, par, width), "--tokenizer", prepared["tokenizer"],
             "--steps", str(args.finetune_steps), "--eval-every", str(args.eval_every),
             "--lr", repr(2.0 ** lr_log2), "--run-dir", str(run_dir), "--keep-checkpoints", "1"]
    if init == "pretrained":
        flags += ["--init-from", str(work / f"pre_{par}_{width}")]
    t0 = time.perf_counter()
    s = finetune(parse_finetune_args(flags), quiet=True)
    best = s.get("best_dev") or {}
    value = best.get(metric, math.nan)
    return {"task": task, "parametrization": par, "width": width, "init": init,
            "lr_log2": lr_log2, "lr": 2.0 ** lr_log2, "metric": metric,
            "score": value if value is not None and math.isfinite(value) else math.nan,
            "dev_loss": s.get("final_val_loss"), "best_step": s.get("best_step"),
            "steps": args.finetune_steps, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "n_train": prepared["tasks"][task]["n_train"],
            "wall_s": round(time.perf_counter() - t0, 2)}


class Table:
    """Rows of one CSV, appended as they come; the rows already there are kept on resume."""

    def __init__(self, path: Path, columns: Sequence[str], resume: bool):
        self.path, self.columns = path, tuple(columns)
        self.rows: list[dict] = []
        if resume and path.exists():
            with path.open() as f:
                self.rows = [dict(r) for r in csv.DictReader(f)]
        else:
            with path.open("w", newline="") as f:
                csv.DictWriter(f, self.columns).writeheader()

    def has(self, **key) -> Optional[dict]:
        return next((r for r in self.rows if all(str(r[k]) == str(v) for k, v in key.items())),
                    None)

    def add(self, row: dict) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns, extrasaction="ignore").writerow(
                {k: ("" if row.get(k) is None else row.get(k)) for k in self.columns})
        self.rows.append({k: str(row.get(k, "")) for k in self.columns})


# --------------------------------------------------------------------------- summary


def summarise(rows: Sequence[dict]) -> tuple[list[dict], dict]:
    """Per (task, parametrization, width, init): the best log2 LR and its score; per task and
    parametrization: how far the pretrained models' best LR moves across width, and the score
    pretraining adds at each width."""
    groups: dict = {}
    for r in rows:
        key = (r["task"], r["parametrization"], int(r["width"]), r["init"])
        groups.setdefault(key, []).append(r)
    summary = []
    for key, rs in sorted(groups.items()):
        finite = [r for r in rs if math.isfinite(float(r["score"]))]
        best = max(finite, key=lambda r: float(r["score"])) if finite else None
        losses = [r for r in rs if r.get("dev_loss") not in (None, "")
                  and math.isfinite(float(r["dev_loss"]))]
        by_loss = min(losses, key=lambda r: float(r["dev_loss"])) if losses else None
        lrs = sorted(float(r["lr_log2"]) for r in rs)
        summary.append({"task": key[0], "parametrization": key[1], "width": key[2],
                        "init": key[3], "metric": rs[0]["metric"],
                        "best_lr_log2": float(best["lr_log2"]) if best else None,
                        "best_score": float(best["score"]) if best else None,
                        "at_grid_edge": bool(best) and float(best["lr_log2"]) in (lrs[0],
                                                                                   lrs[-1]),
                        # the dev loss's optimum: the one to read where every score is 0
                        # (a tagger that predicts no entity at all)
                        "best_dev_loss_lr_log2": float(by_loss["lr_log2"]) if by_loss else None,
                        "best_dev_loss": float(by_loss["dev_loss"]) if by_loss else None,
                        "n_runs": len(rs)})
    claims: dict = {}
    for task in sorted({s["task"] for s in summary}):
        for par in sorted({s["parametrization"] for s in summary}):
            mine = [s for s in summary if (s["task"], s["parametrization"]) == (task, par)]
            pre = {s["width"]: s for s in mine if s["init"] == "pretrained"}
            scr = {s["width"]: s for s in mine if s["init"] == "scratch"}
            def spread(by_width):
                opts = [s["best_lr_log2"] for s in by_width.values()
                        if s["best_lr_log2"] is not None]
                return (max(opts) - min(opts)) if len(opts) > 1 else None

            claims[f"{task}_{par}"] = {
                "pretrained_best_lr_log2_by_width": {w: s["best_lr_log2"]
                                                     for w, s in sorted(pre.items())},
                "scratch_best_lr_log2_by_width": {w: s["best_lr_log2"]
                                                  for w, s in sorted(scr.items())},
                "pretrained_optimum_spread_log2": spread(pre),
                "scratch_optimum_spread_log2": spread(scr),
                "pretraining_gain_by_width": {
                    w: (pre[w]["best_score"] - scr[w]["best_score"])
                    if w in scr and None not in (pre[w]["best_score"], scr[w]["best_score"])
                    else None for w in sorted(pre)}}
    for task in sorted({s["task"] for s in summary}):
        u, s_ = claims.get(f"{task}_umup"), claims.get(f"{task}_sp")
        if u and s_ and None not in (u["pretrained_optimum_spread_log2"],
                                     s_["pretrained_optimum_spread_log2"]):
            claims[f"{task}_umup_optimum_moves_less_than_sp"] = (
                u["pretrained_optimum_spread_log2"] < s_["pretrained_optimum_spread_log2"])
    return summary, claims


def plot(rows: Sequence[dict], path: Path, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in rows})
    pars = [p for p in ("umup", "sp") if any(r["parametrization"] == p for r in rows)]
    fig, axes = plt.subplots(len(tasks), len(pars), figsize=(6 * len(pars), 4 * len(tasks)),
                             squeeze=False)
    widths = sorted({int(r["width"]) for r in rows})
    cmap = plt.get_cmap("viridis")
    for i, task in enumerate(tasks):
        for j, par in enumerate(pars):
            ax = axes[i][j]
            for k, w in enumerate(widths):
                color = cmap(k / max(1, len(widths) - 1) * 0.9)
                for init, style in (("pretrained", "o-"), ("scratch", "s--")):
                    rs = sorted((r for r in rows if (r["task"], r["parametrization"],
                                                     int(r["width"]), r["init"]) ==
                                 (task, par, w, init)), key=lambda r: float(r["lr_log2"]))
                    if rs:
                        ax.plot([float(r["lr_log2"]) for r in rs],
                                [float(r["score"]) for r in rs], style, color=color, ms=4,
                                label=f"width {w}, {init}")
            ax.set_title(f"{task}: {'u-μP' if par == 'umup' else 'SP'}")
            ax.set_xlabel("log2 fine-tuning learning rate")
            ax.set_ylabel("dev " + TASKS[task][1].replace("f1", "entity F1"))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    return _sweep.save_figure(fig, path, title)


# --------------------------------------------------------------------------- main


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    args = build_parser().parse_args(argv)
    mode = _sweep.apply_quick(args, argv, QUICK)
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks or any(t not in TASKS for t in tasks):
        raise SystemExit(f"--tasks takes sst2 and/or wnut17, got {args.tasks!r}")
    pars = _sweep.parametrizations(args.parametrizations)
    widths = _sweep.int_list(args.widths)
    if any(w % args.d_head for w in widths):
        raise SystemExit(f"every width must be a multiple of --d-head {args.d_head}: {widths}")
    grids = {"umup": _sweep.int_list(args.umup_lrs), "sp": _sweep.int_list(args.sp_lrs)}
    tag = args.tag or ("finetune" if mode == "full" else "finetune_quick")
    out = _sweep.out_dir(args, mode)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "tag", "fresh", "quick", "max_runs")}
    settings["mode"] = mode
    meta_path = out / f"{tag}_meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    resume = not args.fresh and old is not None and old.get("settings") == settings
    # the pretrained encoders stay valid when only fine-tuning settings change
    keep_pretrained = (not args.fresh and old is not None
                       and _pretrain_settings(old.get("settings", {}))
                       == _pretrain_settings(settings))
    work = out / f"{tag}_work"
    if not keep_pretrained and work.exists():
        shutil.rmtree(work)
    elif not resume and work.exists():  # fine-tuning runs of other settings: start them over
        for d in work.glob("ft_*"):
            shutil.rmtree(d)
    work.mkdir(parents=True, exist_ok=True)
    meta = {**(old if resume else {}), "settings": settings,
            "pretrained_kept": bool(keep_pretrained and not resume),
            "command": "python experiments/finetune.py " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "machine": _sweep.machine(), "started": (old or {}).get("started") if resume
            else time.strftime("%Y-%m-%d %H:%M:%S"), "runs_this_call": 0}
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    t0 = time.perf_counter()
    prepared = prepare_data(args, work, tasks)
    log(f"finetune ({mode}): tasks {tasks}, widths {widths}, depth {args.depth}, "
        f"{args.pretrain_steps} pretraining / {args.finetune_steps} fine-tuning steps x batch "
        f"{args.batch_size} x seq {args.seq_len}; corpus {prepared['corpus_lines']} sentences")
    pre_table = Table(out / f"{tag}_pretrain.csv", PRE_COLUMNS, keep_pretrained)
    runs = Table(out / f"{tag}_runs.csv", RUN_COLUMNS, resume)
    for par in pars:
        for w in widths:
            if not pre_table.has(parametrization=par, width=w):
                row = pretrain(args, prepared, work, par, w)
                pre_table.add(row)
                log(f"  pretrained {par} width {w}: MLM val loss {row['val_loss']:.4f} "
                    f"({row['wall_s']:.0f} s)")
    missing = 0
    for task in tasks:
        for par in pars:
            for w in widths:
                for init in INITS:
                    for k in grids[par]:
                        key = dict(task=task, parametrization=par, width=w, init=init,
                                   lr_log2=float(k))
                        if runs.has(**key):
                            continue
                        if args.max_runs is not None and meta["runs_this_call"] >= args.max_runs:
                            missing += 1
                            continue
                        row = finetune_one(args, prepared, work, task, par, w, init, float(k))
                        runs.add(row)
                        meta["runs_this_call"] += 1
                        log(f"  {task} {par} width {w} {init} 2^{k:g}: {row['metric']} "
                            f"{row['score']:.4f} ({row['wall_s']:.0f} s)")
    summary, claims = summarise(runs.rows)
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    png = plot(runs.rows, out / f"{tag}.png",
               title=f"fine-tuning ({mode}): depth {args.depth}, {args.finetune_steps} steps x "
               f"{args.batch_size}; pretrained ({args.pretrain_steps} MLM steps) vs scratch")
    meta.update(claims=claims, wall_s=round(time.perf_counter() - t0, 1), runs_missing=missing,
                finished=time.strftime("%Y-%m-%d %H:%M:%S"),
                pretrain_s=sum(float(r["wall_s"]) for r in pre_table.rows),
                finetune_s=sum(float(r["wall_s"]) for r in runs.rows), data=prepared)
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    for s in summary:
        log(f"{s['task']:7s} {s['parametrization']:4s} width {s['width']:4d} {s['init']:10s} "
            f"best 2^{s['best_lr_log2']}: {s['metric']} {s['best_score']}")
    for k, c in claims.items():
        log(f"claim {k}: {c}")
    return {"summary": summary, "claims": claims, "runs": runs.rows, "png": str(png),
            "pretrain": pre_table.rows, "meta": str(meta_path)}


if __name__ == "__main__":
    main()
