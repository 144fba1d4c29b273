"""LoRA vs full fine-tuning on SST-2, and the LoRA learning rate's optimum across ranks and widths.

``--task sst2`` (the default) fine-tunes MLM encoders on SST-2 (steps 1-2 below; score: dev
accuracy). ``--task lm`` measures the same grid on a language model, where the score is a
continuous validation loss and the frozen base carries what the task needs: byte-level decoders
pretrained on the built-in corpus (``pydoc_data.topics``) and adapted, in full or with LoRA, to
``--lm-data`` (tiny Shakespeare); score: validation loss on it (nats per byte); the first
evaluation of every run (step 0) is the pretrained model's loss there. There is no head-only
row for ``lm`` (a decoder's LoRA run trains the adapters only).

1. u-muP and SP encoders pretrained with masked-LM on the SST-2 training sentences at each width
   of ``--widths`` (``experiments/finetune.py``'s ``prepare_data`` and ``pretrain``).
2. Each fine-tuned on SST-2 (``unitscale-jax finetune --init-from``) in full, with the trunk
   frozen (``--freeze-trunk``: the head alone, the floor any adapter must beat), and with LoRA
   adapters on ``--targets`` at every rank of ``--ranks``, over a grid of learning rates
   (powers of 2). u-muP's LoRA uses ``--lora-mult 1`` and the u-muP optimizer's own factors
   (A: ``(d_in L)^-1/2``, B: ``(r L)^-1/2``, see ``unitscale_jax.nn.lora``); SP's is the usual
   LoRA parametrization: ``mult = alpha / r`` (``--sp-alpha``), one Adam learning rate.

Outputs in ``--out`` (default ``experiments/results/``, ``.../quick/`` for ``--quick``):
``<tag>_pretrain.csv``, ``<tag>_runs.csv`` (a row per fine-tuning run, appended as each
finishes; a rerun with the same settings resumes, and one that only widens the grid of LRs,
ranks, widths or parametrizations keeps its rows and adds the new points),
``<tag>_summary.csv`` (per
parametrization, width, method and rank: the best LR, its accuracy, the trainable share),
``<tag>.png`` (accuracy against log2 LR, a panel per parametrization) and ``<tag>_meta.json``
(settings, command, machine, timings, the claims as computed: the spread of the LoRA
optimum across ranks and widths per parametrization, and LoRA's best against full
fine-tuning's).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import _sweep
import finetune as ft

RUN_COLUMNS = ("parametrization", "width", "method", "rank", "lr_log2", "lr", "lora_mult",
               "accuracy", "dev_loss", "best_step", "trainable_params", "total_params",
               "trainable_share", "steps", "wall_s")

QUICK = {"widths": "16,32", "depth": 1, "d_head": 8, "pretrain_steps": 30, "finetune_steps": 20,
         "eval_every": 10, "batch_size": 16, "seq_len": 32, "vocab_size": 500,
         "max_train": 512, "max_dev": 128, "ranks": "2,8", "umup_lrs": "-2,0",
         "sp_lrs": "-8,-6"}


TASK_METRIC = {"sst2": ("accuracy", max), "lm": ("dev_loss", min)}
"""Task -> the run column it is scored by and which end is best."""

GRID_ARGS = ("parametrizations", "widths", "ranks", "umup_lrs", "sp_lrs")
"""The sweep's grid: every row and pretrained model is keyed by its point on it, so a rerun
with a larger grid (another LR, rank or width) keeps the rows it has and adds the rest."""


def _same_setup(old: Optional[dict], new: dict) -> bool:
    """Whether a run with settings ``old`` can be resumed under ``new``: equal but for the grid."""
    if old is None:
        return False
    # settings added after a run started (e.g. --task) count as their defaults in it
    parser = build_parser()
    old = {**{k: parser.get_default(k) for k in new if k not in old}, **old}
    strip = lambda s: {k: v for k, v in s.items() if k not in GRID_ARGS}  # noqa: E731
    return strip(old) == strip(new)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small version (minutes on a 2-core "
                   "CPU); sizes from QUICK, writes <tag>_quick_* files under results/quick/")
    p.add_argument("--task", choices=tuple(TASK_METRIC), default="sst2", help="sst2: "
                   "encoders on SST-2 (accuracy); lm: decoders adapted to --lm-data (loss)")
    p.add_argument("--sst2", default=str(ft.SHARED / "sst2"), help="SST-2 directory")
    p.add_argument("--lm-data", default=str(ft.SHARED / "tinyshakespeare" / "input.txt"),
                   help="--task lm: the text the pretrained decoders are adapted to")
    p.add_argument("--parametrizations", default="umup,sp")
    p.add_argument("--widths", default="64,128", help="two (or more) widths")
    p.add_argument("--ranks", default="4,8,16,32,64")
    p.add_argument("--targets", default="qkv,attn_out,ffn_up,ffn_gate,ffn_down")
    p.add_argument("--sp-alpha", type=float, default=16.0, help="SP LoRA's alpha (mult = "
                   "alpha / r)")
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
    p.add_argument("--max-train", type=int, default=0)
    p.add_argument("--max-dev", type=int, default=0)
    p.add_argument("--umup-lrs", default="-6:2", help="u-muP's log2 LRs (a:b or a,b,...)")
    p.add_argument("--sp-lrs", default="-12:-3", help="SP's log2 LRs")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new "
                   "fine-tuning runs in this call (0: only summarise); rerun to continue")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--tag", default=None)
    p.add_argument("--fresh", action="store_true")
    return p


def _trainable(run_dir: Path) -> tuple[int, int]:
    """(trainable, total) parameter counts of a fine-tuning run, by the library's own labels
    (``finetune.freeze_labels``: heads and adapters with LoRA, everything without)."""
    import jax
    import numpy as np

    from unitscale_jax.train import build
    from unitscale_jax.train.finetune import freeze_labels, load_finetuned
    run = load_finetuned(run_dir, log=lambda m: None)
    params = jax.device_get(run.params)
    sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
    if not (build.uses_lora(run.cfg) or run.cfg.finetune.freeze_trunk):
        return sum(sizes), sum(sizes)
    labels = jax.tree.leaves(freeze_labels(params))
    return sum(s for s, lab in zip(sizes, labels) if lab == "train"), sum(sizes)


def _method_flags(args, par: str, method: str, rank: int) -> tuple[list[str], Optional[float]]:
    """The flags of a fine-tuning method and the LoRA multiplier (None without LoRA)."""
    if method == "lora":
        mult = 1.0 if par == "umup" else args.sp_alpha / rank
        return ["--lora-targets", args.targets, "--lora-rank", str(rank), "--lora-mult",
                repr(mult)], mult
    return (["--freeze-trunk"] if method == "head" else []), None


def _row(args, par, width, method, rank, lr_log2, mult, t0, **scores) -> dict:
    trainable, total = scores.pop("params")
    return {"parametrization": par, "width": width, "method": method, "rank": rank,
            "lr_log2": lr_log2, "lr": 2.0 ** lr_log2, "lora_mult": mult, **scores,
            "trainable_params": trainable, "total_params": total,
            "trainable_share": trainable / total, "steps": args.finetune_steps,
            "wall_s": round(time.perf_counter() - t0, 2)}


def _run_dir(work: Path, par: str, width: int, method: str, rank: int, lr_log2: float) -> Path:
    """The directory of one fine-tuning run."""
    return work / f"ft_{par}_{width}_{method}{rank or ''}_{lr_log2:g}"


def finetune_one(args, prepared: dict, work: Path, par: str, width: int, method: str,
                 rank: int, lr_log2: float) -> dict:
    if args.task == "lm":
        return adapt_lm(args, prepared, work, par, width, method, rank, lr_log2)
    from unitscale_jax.train.finetune import finetune
    from unitscale_jax.train.flags import parse_finetune_args
    run_dir = _run_dir(work, par, width, method, rank, lr_log2)
    extra, mult = _method_flags(args, par, method, rank)
    flags = ["--task", "classify", "--data", prepared["tasks"]["sst2"]["dir"],
             *ft._model_flags(args, par, width), "--tokenizer", prepared["tokenizer"],
             "--steps", str(args.finetune_steps), "--eval-every", str(args.eval_every),
             "--lr", repr(2.0 ** lr_log2), "--run-dir", str(run_dir), "--keep-checkpoints", "1",
             "--init-from", str(work / f"pre_{par}_{width}"), *extra]
    t0 = time.perf_counter()
    s = finetune(parse_finetune_args(flags), quiet=True)
    acc = (s.get("best_dev") or {}).get("accuracy", math.nan)
    return _row(args, par, width, method, rank, lr_log2, mult, t0,
                accuracy=acc if acc is not None and math.isfinite(acc) else math.nan,
                dev_loss=s.get("final_val_loss"), best_step=s.get("best_step"),
                params=_trainable(run_dir))


# --------------------------------------------------------------------------- --task lm


def _lm_flags(args, par: str, width: int, work: Path, run_dir: Path, steps: int,
              lr_log2: float, checkpoint: bool = False) -> list[str]:
    return ["--model", "decoder", *ft._model_flags(args, par, width), "--data-dir",
            str(work / "tfds"), "--steps", str(steps), "--lr", repr(2.0 ** lr_log2),
            "--run-dir", str(run_dir), "--checkpoint" if checkpoint else "--no-checkpoint"]


def pretrain_lm(args, work: Path, par: str, width: int) -> dict:
    """A byte-level decoder trained on the built-in corpus (no ``--data``)."""
    from unitscale_jax.train import run as train_run
    from unitscale_jax.train.flags import parse_train_args
    lr_log2 = args.pretrain_lr_umup if par == "umup" else args.pretrain_lr_sp
    run_dir = work / f"pre_{par}_{width}"
    t0 = time.perf_counter()
    cfg = parse_train_args([*_lm_flags(args, par, width, work, run_dir, args.pretrain_steps,
                                       lr_log2, checkpoint=True),
                            "--eval-every", str(args.pretrain_steps)])
    s = train_run(cfg, quiet=True)
    return {"parametrization": par, "width": width, "lr_log2": lr_log2,
            "steps": args.pretrain_steps, "val_loss": s["final_val_loss"],
            "wall_s": round(time.perf_counter() - t0, 2)}


def adapt_lm(args, prepared: dict, work: Path, par: str, width: int, method: str, rank: int,
             lr_log2: float) -> dict:
    """The pretrained decoder trained on ``--lm-data`` (in full or LoRA's adapters only).

    A non-finite loss (``Diverged``) is a row with a NaN loss; an interrupt (``Interrupted``)
    stops the sweep. Only the adapters train in a decoder's LoRA run, so its trainable
    parameters are its count minus the pretrained model's."""
    from unitscale_jax.train import run as train_run
    from unitscale_jax.train.errors import Diverged
    from unitscale_jax.train.flags import parse_train_args
    run_dir = _run_dir(work, par, width, method, rank, lr_log2)
    extra, mult = _method_flags(args, par, method, rank)
    cfg = parse_train_args([*_lm_flags(args, par, width, work, run_dir, args.finetune_steps,
                                       lr_log2), "--data", prepared["lm_data"],
                            "--eval-every", str(args.eval_every),
                            "--init-from", str(work / f"pre_{par}_{width}"), *extra])
    t0 = time.perf_counter()
    try:
        loss = train_run(cfg, quiet=True)["final_val_loss"]
    except Diverged:
        loss = math.nan
    base = json.loads((work / f"pre_{par}_{width}" / "summary.json").read_text())["n_params"]
    total = json.loads((run_dir / "summary.json").read_text())["n_params"] \
        if (run_dir / "summary.json").is_file() else base
    return _row(args, par, width, method, rank, lr_log2, mult, t0, accuracy=math.nan,
                dev_loss=loss, best_step=None,
                params=(total - base if method == "lora" else total, total))


def zero_shot_lm(work: Path, runs: Sequence[dict]) -> dict:
    """``"<par>_w<width>"`` -> the pretrained decoder's loss on ``--lm-data`` (the step-0
    evaluation of its first adaptation run)."""
    from unitscale_jax.train import read_metrics
    out = {}
    for r in runs:
        key = f"{r['parametrization']}_w{int(r['width'])}"
        if key in out:
            continue
        d = _run_dir(work, r["parametrization"], int(r["width"]), "full", 0,
                     float(r["lr_log2"]))
        first = [m["loss"] for m in read_metrics(d / "metrics.jsonl")
                 if m.get("split") == "validation" and m.get("step") == 0]
        if first:
            out[key] = first[0]
    return out


def summarise(rows: Sequence[dict], task: str = "sst2") -> tuple[list[dict], dict]:
    """Per (parametrization, width, method, rank): the best log2 LR and its score (``sst2``:
    the highest accuracy, ``best_accuracy``; ``lm``: the lowest validation loss,
    ``best_val_loss``); per parametrization: how far LoRA's optimum moves across ranks and
    widths (log2), and LoRA's best score against full fine-tuning's (and the head alone's)
    at each width."""
    column, pick = TASK_METRIC[task]
    name = "accuracy" if task == "sst2" else "val_loss"
    groups: dict = {}
    for r in rows:
        key = (r["parametrization"], int(r["width"]), r["method"], int(r["rank"] or 0))
        groups.setdefault(key, []).append(r)
    summary = []
    for key, rs in sorted(groups.items()):
        finite = [r for r in rs if math.isfinite(float(r[column] or "nan"))]
        best = pick(finite, key=lambda r: float(r[column])) if finite else None
        lrs = sorted(float(r["lr_log2"]) for r in rs)
        shares = [float(r["trainable_share"]) for r in rs
                  if math.isfinite(float(r["trainable_share"] or "nan"))]
        summary.append({"parametrization": key[0], "width": key[1], "method": key[2],
                        "rank": key[3], "best_lr_log2": float(best["lr_log2"]) if best else None,
                        f"best_{name}": float(best[column]) if best else None,
                        "at_grid_edge": bool(best) and float(best["lr_log2"]) in (lrs[0],
                                                                                   lrs[-1]),
                        "trainable_share": max(shares) if shares else None,
                        "n_runs": len(rs)})
    claims: dict = {}
    for par in sorted({s["parametrization"] for s in summary}):
        lora = [s for s in summary if s["parametrization"] == par and s["method"] == "lora"
                and s["best_lr_log2"] is not None]
        opts = [s["best_lr_log2"] for s in lora]
        claims[par] = {
            "lora_best_lr_log2": {f"w{s['width']}_r{s['rank']}": s["best_lr_log2"]
                                  for s in lora},
            "lora_optimum_spread_log2": (max(opts) - min(opts)) if len(opts) > 1 else None,
            "lora_optima_at_grid_edge": sum(s["at_grid_edge"] for s in lora),
            "lora_trainable_share": {f"w{s['width']}_r{s['rank']}": s["trainable_share"]
                                     for s in lora}}
        for method, label in (("full", "full"), ("head", "head_only")):
            ref = {s["width"]: s[f"best_{name}"] for s in summary if s["parametrization"] == par
                   and s["method"] == method and s[f"best_{name}"] is not None}
            if method == "full" or ref:
                claims[par][f"lora_minus_{label}_{name}_by_width"] = {
                    w: pick(s[f"best_{name}"] for s in lora if s["width"] == w) - ref[w]
                    for w in sorted(ref) if any(s["width"] == w for s in lora)}
    u, s_ = claims.get("umup"), claims.get("sp")
    if u and s_ and None not in (u["lora_optimum_spread_log2"], s_["lora_optimum_spread_log2"]):
        claims["umup_lora_optimum_moves_less_than_sp"] = (
            u["lora_optimum_spread_log2"] < s_["lora_optimum_spread_log2"])
    return summary, claims


def plot(rows: Sequence[dict], path: Path, task: str, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pars = [p for p in ("umup", "sp") if any(r["parametrization"] == p for r in rows)]
    fig, axes = plt.subplots(1, len(pars), figsize=(6 * len(pars), 4.5), squeeze=False)
    configs = sorted({(int(r["width"]), r["method"], int(r["rank"] or 0)) for r in rows})
    cmap = plt.get_cmap("viridis")
    ranks = sorted({c[2] for c in configs if c[1] == "lora"})
    for j, par in enumerate(pars):
        ax = axes[0][j]
        for w, method, rank in configs:
            rs = sorted((r for r in rows if (r["parametrization"], int(r["width"]), r["method"],
                                            int(r["rank"] or 0)) == (par, w, method, rank)),
                        key=lambda r: float(r["lr_log2"]))
            if not rs:
                continue
            widths = sorted({c[0] for c in configs})
            style = ("-" if w == widths[-1] else "--") + ("o" if method == "lora" else "s")
            color = {"full": "black", "head": "grey"}.get(method) or cmap(
                ranks.index(rank) / max(1, len(ranks) - 1) * 0.9)
            column = TASK_METRIC[task][0]
            ax.plot([float(r["lr_log2"]) for r in rs], [float(r[column] or "nan") for r in rs],
                    style, color=color, ms=4,
                    label=f"width {w}, " + {"full": "full", "head": "head only"}.get(
                        method, f"LoRA r={rank}"))
        ax.set_title("u-μP (LoRA mult 1)" if par == "umup" else "SP (LoRA alpha / r)")
        ax.set_xlabel("log2 fine-tuning learning rate")
        ax.set_ylabel("SST-2 dev accuracy" if task == "sst2"
                      else "validation loss (nats per byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    return _sweep.save_figure(fig, path, title)


def main(argv: Optional[Sequence[str]] = None, log: Callable[[str], None] = print) -> dict:
    args = build_parser().parse_args(argv)
    mode = _sweep.apply_quick(args, argv, QUICK)
    pars = _sweep.parametrizations(args.parametrizations)
    widths, ranks = _sweep.int_list(args.widths), _sweep.int_list(args.ranks)
    if any(w % args.d_head for w in widths):
        raise SystemExit(f"every width must be a multiple of --d-head {args.d_head}: {widths}")
    if any(r < 1 for r in ranks):
        raise SystemExit(f"--ranks must be positive, got {ranks}")
    grids = {"umup": _sweep.int_list(args.umup_lrs), "sp": _sweep.int_list(args.sp_lrs)}
    stem = "lora" if args.task == "sst2" else "lora_lm"
    tag = args.tag or (stem if mode == "full" else f"{stem}_quick")
    out = _sweep.out_dir(args, mode)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items()
                if k not in ("out", "tag", "fresh", "quick", "max_runs")}
    settings["mode"] = mode
    meta_path = out / f"{tag}_meta.json"
    old = json.loads(meta_path.read_text()) if meta_path.exists() else None
    resume = not args.fresh and old is not None and _same_setup(old.get("settings"), settings)
    work = out / f"{tag}_work"
    if not resume and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    meta = {**(old if resume else {}), "settings": settings,
            "command": "python experiments/lora.py " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "machine": _sweep.machine(), "started": (old or {}).get("started") if resume
            else time.strftime("%Y-%m-%d %H:%M:%S"), "runs_this_call": 0}
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    t0 = time.perf_counter()
    if args.task == "sst2":
        args.wnut17 = args.sst2  # prepare_data reads only the tasks it is given
        prepared = ft.prepare_data(args, work, ["sst2"])
    else:
        prepared = {"lm_data": str(Path(args.lm_data).resolve())}
        if not Path(prepared["lm_data"]).is_file():
            raise SystemExit(f"no file {prepared['lm_data']}; pass --lm-data FILE (a text "
                             "file the pretrained decoders are adapted to).")
    log(f"lora ({mode}): widths {widths}, ranks {ranks}, targets {args.targets}, "
        f"{args.pretrain_steps} pretraining / {args.finetune_steps} fine-tuning steps")
    pre_table = ft.Table(out / f"{tag}_pretrain.csv", ft.PRE_COLUMNS, resume)
    runs = ft.Table(out / f"{tag}_runs.csv", RUN_COLUMNS, resume)
    for par in pars:
        for w in widths:
            if not pre_table.has(parametrization=par, width=w):
                row = (ft.pretrain(args, prepared, work, par, w) if args.task == "sst2"
                       else pretrain_lm(args, work, par, w))
                pre_table.add(row)
                log(f"  pretrained {par} width {w}: val loss {row['val_loss']:.4f}")
    missing = 0
    for par in pars:
        for w in widths:
            baselines = [("full", 0)] + ([("head", 0)] if args.task == "sst2" else [])
            for method, rank in baselines + [("lora", r) for r in ranks]:
                for k in grids[par]:
                    key = dict(parametrization=par, width=w, method=method, rank=rank,
                               lr_log2=float(k))
                    if runs.has(**key):
                        continue
                    if args.max_runs is not None and meta["runs_this_call"] >= args.max_runs:
                        missing += 1
                        continue
                    row = finetune_one(args, prepared, work, par, w, method, rank, float(k))
                    runs.add(row)
                    meta["runs_this_call"] += 1
                    score = TASK_METRIC[args.task][0]
                    log(f"  {par} width {w} {method}{rank or ''} 2^{k:g}: {score} "
                        f"{float(row[score]):.4f}, trainable {row['trainable_share']:.2%} "
                        f"({row['wall_s']:.0f} s)")
    summary, claims = summarise(runs.rows, args.task)
    if args.task == "lm":
        claims["zero_shot_val_loss"] = zero_shot_lm(work, runs.rows)
    _sweep.write_csv(out / f"{tag}_summary.csv", summary)
    png = plot(runs.rows, out / f"{tag}.png", args.task,
               title=("SST-2" if args.task == "sst2" else Path(args.lm_data).name)
               + f" LoRA vs full ({mode}): depth {args.depth}, {args.finetune_steps} "
               f"steps x {args.batch_size}, LoRA on {len(args.targets.split(','))} projections")
    meta.update(claims=claims, wall_s=round(time.perf_counter() - t0, 1), runs_missing=missing,
                finished=time.strftime("%Y-%m-%d %H:%M:%S"), data=prepared)
    meta_path.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    for k, c in claims.items():
        log(f"claim {k}: {c}")
    return {"summary": summary, "claims": claims, "runs": runs.rows, "png": str(png),
            "meta": str(meta_path)}


if __name__ == "__main__":
    main()
