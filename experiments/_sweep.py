"""Shared machinery of the hyperparameter-transfer experiments.

``train_lr_group(cfg, lrs)`` trains one model configuration at several peak learning rates at
once: the trainer's own pieces (``train.build_model``, ``train.build_optimizer``, the data
pipeline, the initial state, ``make_train_step`` and ``make_eval_step`` of
``unitscale_jax.train``) with the learning rate moved into the optimizer state and the train
step ``jax.vmap``-ed over it (``train.Trainer`` itself runs one sharded state, not lanes). On a
small CPU this costs one compilation per configuration instead of one per run (compilation
dominates runs this small).

Why this equals separate ``train.run`` calls: with no weight decay, both the u-muP Adam of
``unitscale_jax.optim`` and optax's Adam return ``-eta_t * f * m_hat / (sqrt(v_hat) + eps)``
(``f`` the u-muP per-tensor factor, 1 for SP), linear in the peak learning rate ``eta``, and
every schedule of the trainer is ``eta`` times a shape; so the optimizer built with peak 1 and
its update multiplied by ``eta`` is the optimizer built with peak ``eta``
(``tests/experiments/test_sweep_driver.py`` checks it against ``train.run``). Every lane starts
from the same initial weights and sees the same batches. A lane whose loss becomes non-finite is
recorded as diverged; the other lanes are independent of it.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "experiments" / "results"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def data_path(arg: Optional[str]) -> Optional[str]:
    """The ``--data`` value: a path, ``builtin`` (the trainer's built-in corpus), or the default
    tiny Shakespeare file next to the repository."""
    if arg == "builtin":
        return None
    path = Path(arg) if arg else DEFAULT_DATA
    if not path.is_file():
        raise SystemExit(f"data file {path} not found; pass --data PATH (a text file) or "
                         "--data builtin for the trainer's built-in corpus.")
    return str(path)


class LaneLRState(NamedTuple):
    """The peak learning rate of one lane (a scalar; stacked over lanes under vmap)."""

    lr: Any


def scale_by_lane_lr():
    """``updates * state.lr``: the last transform of a sweep lane's optimizer."""
    import jax
    import jax.numpy as jnp
    import optax

    def init(params):
        del params
        return LaneLRState(lr=jnp.ones((), jnp.float32))

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u: u * state.lr.astype(u.dtype), updates), state

    return optax.GradientTransformation(init, update)


def base_config(*, parametrization: str, width: int, depth: int, d_head: int, seq_len: int,
                batch_size: int, steps: int, schedule: str, data: Optional[str],
                seed: int = 0, eval_batches: int = 16, model: Optional[dict] = None):
    """The trainer config of one sweep configuration (learning rate left at 1)."""
    from unitscale_jax import train
    if width % d_head:
        raise SystemExit(f"width {width} is not a multiple of --d-head {d_head}.")
    return train.get_preset("tiny").replace(
        model={"parametrization": parametrization, "d_model": width, "n_layers": depth,
               "n_heads": width // d_head, "d_head": d_head, "sp_init_std": 0.02,
               **(model or {})},
        data={"data": data, "seq_len": seq_len},
        optimizer={"name": "adam", "lr": 1.0, "schedule": schedule, "weight_decay": 0.0},
        training={"steps": steps, "batch_size": batch_size, "eval_every": 0,
                  "eval_batches": eval_batches, "seed": seed, "checkpoint": False,
                  "tensorboard": False, "plot": False, "progress": False,
                  "run_dir": "/nonexistent-unused"})


def train_lr_group(cfg, lrs: Sequence[float], *, log: Callable[[str], None] = print,
                   check_every: int = 25) -> dict:
    """Trains ``cfg`` once per peak learning rate in ``lrs`` (vmapped lanes).

    Args:
      cfg: a trainer ``Config`` with ``weight_decay`` 0 and no ``plateau`` schedule (its
        ``optimizer.lr`` is ignored).
      lrs: peak learning rates.
      log: progress printer.
      check_every: steps between checks that stop early once every lane has diverged.

    Returns:
      ``{"lanes": [{"lr", "val_loss", "train_loss", "diverged", "diverged_step"}, ...],
      "n_params", "tokens", "wall_s", "compile_s", "step_s"}``. ``train_loss`` is the mean
      training loss of the last 10% of steps; ``val_loss`` the loss on the trainer's validation
      batches after the last step; ``step_s`` the mean wall time of one step of all the lanes
      after the first (compiled) one, None when only one step ran.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from unitscale_jax import nn, train
    from unitscale_jax.train import step as steplib
    from unitscale_jax.train.data import load_data
    from unitscale_jax.train.trainer import init_state_fn

    t0 = time.perf_counter()
    cfg = train.resolve(cfg.replace(optimizer={"lr": 1.0}))
    if cfg.optimizer.weight_decay:
        raise ValueError("train_lr_group needs weight_decay 0: weight decay does not scale "
                         "with the learning rate, so lanes would not equal separate runs.")
    if cfg.optimizer.schedule == "plateau":
        raise ValueError("train_lr_group does not support the plateau schedule.")
    lrs = [float(x) for x in lrs]
    if not lrs or not all(x > 0 and math.isfinite(x) for x in lrs):
        raise ValueError(f"learning rates must be positive and finite, got {lrs}.")
    n = len(lrs)
    data = load_data(cfg, log=lambda msg: None)
    task = train.get_task(cfg.model.kind)
    model = nnx.eval_shape(lambda: train.build_model(cfg, data.vocab_size))
    graphdef, abstract = nnx.split(model, nnx.Param)
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(abstract))
    tx_ref, schedule = train.build_optimizer(cfg, nnx.to_pure_dict(nn.param_info(model)))
    tx = optax.chain(tx_ref, scale_by_lane_lr())
    # the trainer's initial state, built eagerly (as the sweeps always were), once per lane
    init = init_state_fn(cfg, data.vocab_size, tx)()
    opt_state = init["opt_state"][:-1] + (LaneLRState(lr=jnp.asarray(lrs, jnp.float32)),)
    stack = lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x))  # noqa: E731
    state = {"params": jax.tree.map(stack, init["params"]),
             "opt_state": tuple(jax.tree.map(stack, opt_state[:-1])) + (opt_state[-1],),
             "step": stack(init["step"]), "rng": stack(init["rng"])}
    train_step = steplib.make_train_step(graphdef, task, tx, schedule, use_value=False)
    step_fn = jax.jit(jax.vmap(train_step, in_axes=(0, None)))
    eval_fn = jax.jit(jax.vmap(steplib.make_eval_step(graphdef, task), in_axes=(0, None)))

    it = data.train_iterator(cfg)
    steps = cfg.training.steps
    tail = max(1, steps // 10)
    losses, tail_sum = [], jnp.zeros((n,), jnp.float32)
    first_bad = np.full((n,), -1)
    compile_s = None
    for i in range(steps):
        batch = {k: jnp.asarray(v) for k, v in next(it).items()}
        state, m = step_fn(state, batch)
        if compile_s is None:
            jax.block_until_ready(m)
            t_first = time.perf_counter()
            compile_s = t_first - t0
        losses.append(m["loss"])
        if i >= steps - tail:
            tail_sum = tail_sum + m["loss"]
        if (i + 1) % check_every == 0 or i + 1 == steps:
            chunk = np.asarray(jax.device_get(jnp.stack(losses)))
            losses = []
            for lane in range(n):
                bad = np.flatnonzero(~np.isfinite(chunk[:, lane]))
                if first_bad[lane] < 0 and bad.size:
                    first_bad[lane] = i + 1 - chunk.shape[0] + bad[0] + 1
            if (first_bad >= 0).all():
                log(f"    every lane diverged by step {i + 1}; stopping early")
                break
    steps_done = i + 1  # the losses up to step i were fetched above: the lanes are synced
    step_s = (time.perf_counter() - t_first) / (steps_done - 1) if steps_done > 1 else None
    total, count = np.zeros((n,)), 0.0
    for b in data.eval_batches(cfg, cfg.training.eval_batches):
        s, c = eval_fn(state["params"], {k: jnp.asarray(v) for k, v in b.items()})["loss"]
        total += np.asarray(s, np.float64)
        count += float(np.asarray(c)[0])
    val = total / max(count, 1.0)
    train_tail = np.asarray(tail_sum) / tail
    lanes = []
    for lane, lr in enumerate(lrs):
        diverged = bool(first_bad[lane] >= 0 or not math.isfinite(val[lane]))
        lanes.append({"lr": lr, "val_loss": float(val[lane]), "train_loss":
                      float(train_tail[lane]), "diverged": diverged,
                      "diverged_step": int(first_bad[lane]) if first_bad[lane] >= 0 else None})
    return {"lanes": lanes, "n_params": n_params,
            "tokens": steps * cfg.training.batch_size * cfg.data.seq_len,
            "wall_s": time.perf_counter() - t0, "compile_s": compile_s, "step_s": step_s}


def estimate_cost(plan: Sequence[dict], *, steps: int = 3,
                  log: Callable[[str], None] = print) -> dict:
    """The projected wall time of a sweep, from a few timed steps of each of its shapes.

    Args:
      plan: one entry per kind of group: ``{"label", "cfg", "lanes", "groups"}`` (``groups``
        vmapped groups of ``lanes`` lanes of ``cfg`` at its own ``training.steps``).
      steps: steps timed per shape (the first one, compilation included, is timed apart).
      log: progress printer.

    Returns:
      ``{"items": [... with "compile_s", "step_s", "n_params", "projected_s"], "total_s"}``;
      ``projected_s = groups * (compile_s + cfg steps * step_s)``, the validation passes not
      counted. Shapes that differ only in their learning rates are timed once.
    """
    cache: dict = {}
    items = []
    for e in plan:
        cfg = e["cfg"]
        key = (repr(cfg.replace(training={"steps": steps, "seed": 0})), e["lanes"])
        if key not in cache:
            g = train_lr_group(cfg.replace(training={"steps": steps, "eval_batches": 1}),
                               [1e-6] * e["lanes"], log=log)
            cache[key] = {"compile_s": round(g["compile_s"], 2),
                          "step_s": round(g["step_s"], 4), "n_params": g["n_params"]}
            log(f"  timed {e['label']}: {e['lanes']} lane(s), {g['n_params']:,} params: "
                f"{g['step_s']:.3f} s/step, first step {g['compile_s']:.1f} s")
        t = cache[key]
        run_steps = cfg.training.steps
        items.append({"label": e["label"], "lanes": e["lanes"], "groups": e["groups"],
                      "steps": run_steps, **t,
                      "projected_s": round(e["groups"] * (t["compile_s"]
                                                          + run_steps * t["step_s"]), 1)})
    return {"items": items, "total_s": round(sum(i["projected_s"] for i in items), 1),
            "timed_steps": steps, "machine": machine()}


def write_estimate(path: Path, est: dict, log: Callable[[str], None] = print) -> dict:
    """Writes an ``estimate_cost`` result (with whatever was added to it) to ``path`` as JSON
    and prints its items and total; returns ``est``."""
    path.write_text(json.dumps(est, indent=2, default=str) + "\n")
    for i in est["items"]:
        log(f"  {i['label']:34} {i['groups']:3d} x {i['lanes']} lanes x {i['steps']} steps: "
            f"{i['projected_s'] / 3600:7.2f} h")
    log(f"projected total: {est['total_s'] / 3600:.1f} h (wrote {path})")
    return est


# --------------------------------------------------------------------------- results on disk

COLUMNS = ("experiment", "parametrization", "width", "depth", "d_head", "n_heads", "multiplier",
           "multiplier_value", "lr_log2", "lr", "val_loss", "train_loss", "diverged",
           "diverged_step", "steps", "batch_size", "seq_len", "tokens", "n_params", "schedule",
           "seed", "group_wall_s")


def _parse(row: dict) -> dict:
    out = dict(row)
    for k in ("width", "depth", "d_head", "n_heads", "steps", "batch_size", "seq_len", "tokens",
              "n_params", "seed"):
        out[k] = int(row[k])
    for k in ("lr_log2", "lr", "val_loss", "train_loss", "group_wall_s"):
        out[k] = float(row[k])
    out["multiplier_value"] = float(row["multiplier_value"]) if row["multiplier_value"] else None
    out["multiplier_value_log2"] = (math.log2(out["multiplier_value"])
                                    if out["multiplier_value"] else None)
    out["diverged"] = row["diverged"] in ("True", "true", "1")
    out["diverged_step"] = int(row["diverged_step"]) if row["diverged_step"] else None
    return out


class Store:
    """Every run of one experiment, appended to ``<out>/<tag>_runs.csv`` as soon as its group
    finishes (a crash loses at most the group in progress). With ``resume`` and an unchanged
    ``settings`` dict, rows already on disk are kept and their runs are not repeated."""

    def __init__(self, out: Path, tag: str, settings: dict, *, resume: bool,
                 log: Callable[[str], None] = print):
        self.out, self.tag, self.settings = Path(out), tag, settings
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv = self.out / f"{tag}_runs.csv"
        self.meta_path = self.out / f"{tag}_meta.json"
        self.rows: list[dict] = []
        old = json.loads(self.meta_path.read_text()) if self.meta_path.exists() else None
        now = time.strftime("%Y-%m-%d %H:%M:%S")
        if resume and old and old.get("settings") == settings and self.csv.exists():
            with self.csv.open() as f:
                self.rows = [_parse(r) for r in csv.DictReader(f)]
            log(f"resuming: {len(self.rows)} runs already in {self.csv}")
            self.meta = {**old, "resumed": now}
        else:
            with self.csv.open("w", newline="") as f:
                csv.DictWriter(f, COLUMNS).writeheader()
            self.meta = {"settings": settings, "started": now, "groups": []}
        self.meta["groups_this_call"] = 0
        self.write_meta()

    def write_meta(self, **extra) -> None:
        self.meta.update(extra)
        self.meta_path.write_text(json.dumps(self.meta, indent=2, default=str) + "\n")

    def add(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        with self.csv.open("a", newline="") as f:
            w = csv.DictWriter(f, COLUMNS)
            for r in rows:
                w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in COLUMNS})
        self.rows.extend(rows)

    def select(self, **key) -> list[dict]:
        return [r for r in self.rows if all(r.get(k) == v for k, v in key.items())]


def par_label(model) -> str:
    """A run's parametrization as the tables name it: ``umup``, ``sp``, ``mup``, and
    ``umup_a1`` for u-muP with CompleteP's depth exponent 1 (``--depth-exponent 1``)."""
    a = float(getattr(model, "depth_exponent", 0.5))
    return model.parametrization if a == 0.5 else f"{model.parametrization}_a{a:g}"


def run_group(store: Store, experiment: str, cfg, lr_log2s: Sequence[float], *,
              multiplier: str = "", multiplier_value: Optional[float] = None,
              log: Callable[[str], None] = print) -> list[dict]:
    """Trains ``cfg`` at learning rates ``2**lr_log2s`` (one vmapped group) and stores a row
    per run."""
    m, d, t = cfg.model, cfg.data, cfg.training
    lrs = [2.0 ** k for k in lr_log2s]
    label = par_label(m)
    log(f"  {experiment}: {label} width {m.d_model} depth {m.n_layers}"
        + (f" {multiplier}" if multiplier else "")
        + (f"={multiplier_value:g}" if multiplier and multiplier_value is not None else "")
        + f", log2 lr {list(lr_log2s)}")
    g = train_lr_group(cfg, lrs, log=log)
    rows = []
    for k, lane in zip(lr_log2s, g["lanes"]):
        rows.append({
            "experiment": experiment, "parametrization": label, "width": m.d_model,
            "depth": m.n_layers, "d_head": m.d_head, "n_heads": m.n_heads,
            "multiplier": multiplier, "multiplier_value": multiplier_value,
            "multiplier_value_log2": (math.log2(multiplier_value) if multiplier_value
                                      else None), "lr_log2": k,
            "lr": lane["lr"], "val_loss": lane["val_loss"], "train_loss": lane["train_loss"],
            "diverged": lane["diverged"], "diverged_step": lane["diverged_step"],
            "steps": t.steps, "batch_size": t.batch_size, "seq_len": d.seq_len,
            "tokens": g["tokens"], "n_params": g["n_params"], "schedule": cfg.optimizer.schedule,
            "seed": t.seed, "group_wall_s": round(g["wall_s"], 2)})
    store.add(rows)
    store.meta["groups"].append({"experiment": experiment, "parametrization": label,
                                 "width": m.d_model, "depth": m.n_layers,
                                 "multiplier": multiplier, "value": multiplier_value,
                                 "lr_log2": list(lr_log2s), "wall_s": round(g["wall_s"], 2),
                                 "seed": t.seed, "compile_s": round(g["compile_s"] or 0.0, 2)})
    store.meta["groups_this_call"] = store.meta.get("groups_this_call", 0) + 1
    store.write_meta()
    log("    " + ", ".join(f"2^{k:g}: " + ("diverged" if r["diverged"] else f"{r['val_loss']:.4f}")
                          for k, r in zip(lr_log2s, rows)) + f"  ({g['wall_s']:.0f} s)")
    return rows


def score(row: dict) -> float:
    """The validation loss of a run; +inf when it diverged."""
    v = row["val_loss"]
    return v if (not row["diverged"] and math.isfinite(v)) else math.inf


def mean_curve(rows: Sequence[dict], x: str = "lr_log2") -> list[dict]:
    """Rows of several seeds -> one row per ``x``: ``val_loss`` the mean over seeds (a run
    that diverged makes the point diverged), ``val_loss_std``, ``n_seeds`` and
    ``best_seed_losses`` (the seeds' own losses)."""
    by_x: dict = {}
    for r in rows:
        by_x.setdefault(r[x], []).append(r)
    out = []
    for k in sorted(by_x):
        rs = sorted(by_x[k], key=lambda r: r["seed"])
        losses = [r["val_loss"] for r in rs]
        diverged = any(r["diverged"] or not math.isfinite(r["val_loss"]) for r in rs)
        mean = sum(losses) / len(losses) if not diverged else math.nan
        var = (sum((v - mean) ** 2 for v in losses) / (len(losses) - 1)
               if len(losses) > 1 and not diverged else None)
        out.append({x: k, "val_loss": mean, "val_loss_std": None if var is None else var ** 0.5,
                    "diverged": diverged, "n_seeds": len(rs), "seeds": [r["seed"] for r in rs],
                    "seed_losses": losses})
    return out


def sweep_curve(store: Store, experiment: str, cfg_for_seed: Callable[[int], Any],
                initial: Sequence[float], limits: tuple[float, float], *, extend: bool,
                key: dict, seeds: Sequence[int] = (0,), log: Callable[[str], None] = print,
                x: str = "lr_log2", run_points: Optional[Callable[[int, list], Any]] = None,
                extra: Sequence[dict] = (), step: int = 2) -> list[dict]:
    """Sweeps ``log2 lr`` over ``initial`` for every seed (``cfg_for_seed(seed)`` is the
    config); with ``extend``, adds ``step`` more powers of 2 beyond an end of the evaluated
    range while the best point of the seed-averaged curve sits at that end (within ``limits``),
    so its optimum ends up with an evaluated, worse neighbour on each side. Every seed
    evaluates the same points. Returns the seed-averaged curve (``mean_curve``).

    Another axis: ``x`` names the row field swept (e.g. ``multiplier_value_log2``) and
    ``run_points(seed, todo)`` trains and stores the missing points of one seed (default: one
    vmapped group of ``cfg_for_seed(seed)`` at learning rates ``2**todo``). ``extra`` rows
    (points evaluated elsewhere, e.g. a shared baseline) count as evaluated for their seeds.
    """
    def runs(seed=None):
        sel = store.select(experiment=experiment, **key) + list(extra)
        return [r for r in sel if seed is None or r["seed"] == seed]

    if run_points is None:
        def run_points(seed, todo):
            run_group(store, experiment, cfg_for_seed(seed), todo, log=log)

    grid = set(initial) | {r[x] for r in runs() if r["seed"] in seeds}
    while True:
        for seed in seeds:
            todo = sorted(grid - {r[x] for r in runs(seed)})
            if todo:
                run_points(seed, todo)
        curve = mean_curve([r for r in runs() if r["seed"] in seeds], x)
        if not extend:
            return curve
        e = {r[x]: r for r in curve}
        lo, hi = min(e), max(e)
        finite = {k: score(r) for k, r in e.items() if math.isfinite(score(r))}
        nxt = []
        if not finite:
            nxt = [lo - j for j in range(1, step + 1)]
        else:
            best = min(finite, key=finite.get)
            if best == hi:
                nxt += [hi + j for j in range(1, step + 1)]
            if best == lo:
                nxt += [lo - j for j in range(1, step + 1)]
        nxt = [k for k in nxt if limits[0] <= k <= limits[1] and k not in e]
        if not nxt:
            return curve
        grid |= set(nxt)


def optimum(rows: Sequence[dict], x: str = "lr_log2") -> dict:
    """The best run of a curve: ``best`` (its ``x``), ``loss``, ``bracketed`` (an evaluated,
    worse neighbour on both sides) and ``vertex``: the minimum of the parabola through the
    best point and its two neighbours (log2 units; None unless bracketed on a uniform grid)."""
    rows = sorted(rows, key=lambda r: r[x])
    s = [score(r) for r in rows]
    if not rows or not any(math.isfinite(v) for v in s):
        return {"best": None, "loss": math.inf, "bracketed": False, "vertex": None,
                "n_runs": len(rows), "n_diverged": sum(r["diverged"] for r in rows)}
    i = min(range(len(rows)), key=lambda j: s[j])
    bracketed = 0 < i < len(rows) - 1
    vertex = None
    if bracketed and math.isfinite(s[i - 1]) and math.isfinite(s[i + 1]):
        h1, h2 = rows[i][x] - rows[i - 1][x], rows[i + 1][x] - rows[i][x]
        curv = s[i - 1] - 2 * s[i] + s[i + 1]
        if abs(h1 - h2) < 1e-9 and curv > 0:
            vertex = rows[i][x] + 0.5 * h1 * (s[i - 1] - s[i + 1]) / curv
    return {"best": rows[i][x], "loss": s[i], "bracketed": bracketed, "vertex": vertex,
            "n_runs": len(rows), "n_diverged": sum(r["diverged"] for r in rows)}


def line_fit(xs: Sequence[float], ys: Sequence[float]) -> dict:
    """The least-squares line ``y = c + k x`` (``scipy.stats.linregress``): ``k``, ``c``,
    ``n_points``, and with more than two points the standard error ``k_se`` of ``k`` and its
    95% interval ``k_lo .. k_hi`` (Student t, ``n - 2`` degrees of freedom; None otherwise)."""
    from scipy import stats

    out = {"n_points": len(xs), "k": None, "c": None, "k_se": None, "k_lo": None,
           "k_hi": None}
    if len(set(xs)) < 2:
        return out
    res = stats.linregress(xs, ys)
    out.update(k=float(res.slope), c=float(res.intercept))
    if len(xs) > 2:
        # the textbook standard error (linregress' is nan when every y is the same)
        mx = sum(xs) / len(xs)
        resid = sum((y - out["c"] - out["k"] * x) ** 2 for x, y in zip(xs, ys))
        se = math.sqrt(resid / (len(xs) - 2) / sum((x - mx) ** 2 for x in xs))
        half = float(stats.t.ppf(0.975, len(xs) - 2)) * se
        out.update(k_se=se, k_lo=out["k"] - half, k_hi=out["k"] + half)
    return out


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    with Path(path).open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if v is None else (f"{v:.6g}" if isinstance(v, float) else v))
                        for k, v in r.items()})
    return Path(path)


def machine() -> dict:
    import platform

    import jax
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "jax": jax.__version__,
            "backend": jax.default_backend(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}


def plot_lr_curves(curves: dict, path: Path, *, title: str, label: str,
                   x: str = "lr_log2", xlabel: str = "log2 learning rate") -> Path:
    """Two panels (u-muP, SP): loss against ``x``, one curve per entry of
    ``curves[parametrization][value]`` (a list of rows), the optimum starred, diverged runs as
    crosses on the top edge."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pars = [p for p in ("umup", "sp") if p in curves]
    fig, axes = plt.subplots(1, len(pars), figsize=(6 * len(pars), 4.5), squeeze=False)
    names = {"umup": "u-μP (unitscale_jax.optim Adam)", "sp": "SP (optax Adam, init std 0.02)"}
    for ax, par in zip(axes[0], pars):
        values = sorted(curves[par])
        cmap = plt.get_cmap("viridis")
        finite = [score(r) for v in values for r in curves[par][v] if math.isfinite(score(r))]
        if finite:
            lo = min(finite)
            top = min(max(finite), lo + 1.5)
            ax.set_ylim(lo - 0.05 * (top - lo + 0.1), top + 0.05)
        for j, v in enumerate(values):
            rows = sorted(curves[par][v], key=lambda r: r[x])
            color = cmap(j / max(1, len(values) - 1) * 0.9)
            ok = [r for r in rows if math.isfinite(score(r))]
            err = [r.get("val_loss_std") or 0.0 for r in ok]
            n = max([r.get("n_seeds", 1) for r in rows] or [1])
            ax.errorbar([r[x] for r in ok], [r["val_loss"] for r in ok],
                        yerr=err if n > 1 else None, fmt="o-", color=color, ms=4, capsize=2,
                        label=f"{label} {v}" + (f" (mean of {n} seeds ± std)" if n > 1
                                                 else ""))
            bad = [r for r in rows if not math.isfinite(score(r))]
            if bad and finite:
                ax.plot([r[x] for r in bad], [ax.get_ylim()[1]] * len(bad), "x", color=color,
                        ms=8, clip_on=False)
            o = optimum(rows, x)
            if o["best"] is not None:
                ax.plot([o["best"]], [o["loss"]], "*", color=color, ms=14, mec="k")
        ax.set_title(names.get(par, par))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats / byte)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def add_common_args(p, *, steps: int, batch_size: int, seq_len: int) -> None:
    p.add_argument("--quick", action="store_true", help="a small version (a few minutes on a "
                   "2-core CPU); writes <tag>_quick_* files")
    p.add_argument("--smoke", action="store_true", help="the smallest version (the smoke test)")
    p.add_argument("--data", default=None, help="text file (default: "
                   "../shared/data/tinyshakespeare/input.txt) or 'builtin'")
    p.add_argument("--out", default=None, help="output directory (default experiments/results/, "
                   "experiments/results/quick/ for --quick and --smoke)")
    p.add_argument("--tag", default=None, help="file name prefix of the outputs")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seq-len", type=int, default=seq_len)
    p.add_argument("--schedule", default="warmup_cosine", choices=("constant", "warmup_cosine"),
                   help="learning-rate schedule (10%% linear warmup; cosine to 0.1x)")
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fresh", action="store_true", help="ignore runs already in the output "
                   "CSV (default: resume when the settings match)")


def out_dir(args, mode: str) -> Path:
    """``--out``, else ``experiments/results`` (full) or ``experiments/results/quick``."""
    return Path(args.out) if args.out else (RESULTS if mode == "full" else RESULTS / "quick")


def int_list(s: str) -> list[int]:
    """``"16,32,64"`` -> ``[16, 32, 64]``; ``"-3:3"`` -> ``[-3, ..., 3]``."""
    if ":" in s:
        a, b = s.split(":")
        return list(range(int(a), int(b) + 1))
    return [int(v) for v in s.split(",") if v.strip()]


def apply_quick(args, argv: Optional[Sequence[str]], quick: dict) -> str:
    """``"quick"`` (``--quick``: ``quick``'s values set on ``args``, except the options the
    command line gives) or ``"full"``."""
    if not args.quick:
        return "full"
    given = set(a.split("=")[0] for a in (argv or []))
    for k, v in quick.items():
        if "--" + k.replace("_", "-") not in given:
            setattr(args, k, v)
    return "quick"


def parametrizations(s: str, allowed: Sequence[str] = ("umup", "sp")) -> list[str]:
    """``"umup,sp"`` -> ``["umup", "sp"]``; a name not in ``allowed`` is a ``SystemExit``."""
    pars = [p for p in s.split(",") if p]
    if not pars or any(p not in allowed for p in pars):
        raise SystemExit(f"--parametrizations takes {' and/or '.join(allowed)}, got {s!r}")
    return pars


def save_figure(fig, path: Path, title: str, fontsize: int = 10) -> Path:
    """Titles, lays out, writes (120 dpi) and closes a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
