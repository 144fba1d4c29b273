"""Coordinate check: the size of every module's output after 0..k Adam steps, across widths.

The test of Yang et al. (Tensor Programs V, arXiv 2203.03466, section 8 / appendix D.1, the
figures of its coordinate checks): train models of growing width for a few steps at a high
learning rate and record the mean absolute value per coordinate (``mean_abs``, what TP5
plots; the RMS is recorded too) of every activation. In a parametrization with a
width-independent update (muP, u-muP) the curves against width stay flat at every step; in
the standard parametrization (SP, here with plain Adam at one learning rate for every tensor)
the hidden activations grow with width once training starts, because an Adam step changes
each of ``fan_in`` weights by about ``lr`` and the change of the output adds up ``fan_in``
aligned terms. ``width_ratios`` puts a number on it: per module, the ratio of the largest to
the smallest value across widths at one step, and the slope of ``log2`` value against
``log2`` width.

u-muP is trained with ``unitscale_jax.optim.adam`` (per-tensor factors ``fan_in^-1/2``,
``depth^-1/2``; Blake et al., 2025, table 2), muP with ``unitscale_jax.optim.mup_adam``
(hidden weights at ``base_fan_in / fan_in`` of the learning rate; TP5, table 3), SP with
``optax.adam``. The data is a fixed batch of random token ids (the model memorises it, which
makes updates as aligned as they get). Activations are those tapped by the models
(``unitscale_jax.nn.tap``), measured on the training batch in the forward pass of each step;
step ``t`` means after ``t`` updates.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np
import optax
from flax import nnx

from unitscale_jax import nn
from unitscale_jax.analysis import naming
from unitscale_jax.nn import TransformerConfig
from unitscale_jax.train.step import make_train_step, new_state
from unitscale_jax.train.tasks import ModelLoss

WIDTHS = tuple(2 ** k for k in range(6, 12))
"""The full check's widths: 2^6 ... 2^11 (64 ... 2048)."""
QUICK_WIDTHS = (64, 128, 256, 512)
STEPS = 5
"""Adam steps of the check (TP5's coordinate checks plot steps 1 ... 5)."""
STATS = ("mean_abs", "rms")
"""The statistics recorded per activation: mean |x| (TP5's "l1") and the RMS."""
LEARNING_RATES = {"umup": 2.0**1, "mup": 2.0**-5, "sp": 2.0**-6}
"""High learning rates: twice u-muP's usual optimum (2^0), ~4x SP's optimum at width 128, and
for muP (``base_fan_in`` 64: at width 64 its hidden weights step as SP's) twice SP's."""


def default_optimizer(parametrization: str, learning_rate: float, model: nnx.Module
                      ) -> optax.GradientTransformation:
    """u-muP: ``optim.adam(lr, param_info=model)``; muP: ``optim.mup_adam(lr,
    param_info=model)`` (``base_fan_in`` ``optim.DEFAULT_BASE_FAN_IN``); SP: ``optax.adam(lr)``."""
    from unitscale_jax import optim
    p = nn.get_parametrization(parametrization)
    if p.unit_scaled:
        return optim.adam(learning_rate, param_info=nn.param_info(model))
    if isinstance(p, nn.MuP):
        return optim.mup_adam(learning_rate, param_info=nn.param_info(model))
    if p == nn.SP():
        return optax.adam(learning_rate)
    raise ValueError(f"coord_check: no default optimizer for parametrization {parametrization!r}; "
                     f"pass optimizer=(parametrization, lr, model) -> optax transform.")


def default_model(parametrization: str, width: int, *, config: Optional[TransformerConfig] = None,
                  d_head: int = 16, seed: int = 0) -> nnx.Module:
    """An unrolled ``TransformerDecoder`` of ``width`` with ``width // d_head`` heads.

    The default base config has 2 layers, vocabulary 256 and ``sp_init_std=None``: SP weights
    start at std ``fan_in^-1/2`` (PyTorch's default, the SP of Tensor Programs V's coordinate
    checks), so every parametrization starts flat and any growth with width comes from
    training (GPT-2's fixed std 0.02 would already grow as ``sqrt(width)`` at step 0).
    """
    if config is None:
        config = TransformerConfig(vocab_size=256, d_model=width, n_layers=2, n_heads=1,
                                   max_seq_len=64, sp_init_std=None)
    if width % d_head:
        raise ValueError(f"coord_check: width {width} is not a multiple of d_head {d_head}.")
    c = config.replace(d_model=width, n_heads=width // d_head, d_head=None,
                       parametrization=parametrization, scan_layers=False)
    return nn.TransformerDecoder(c, rngs=nnx.Rngs(seed))


def _run(model: nnx.Module, tx: optax.GradientTransformation, ids: jax.Array, steps: int,
         jit: bool, learning_rate: float) -> list[tuple[float, dict]]:
    graphdef, params = nnx.split(model, nnx.Param)
    step = make_train_step(graphdef, ModelLoss(), tx, optax.constant_schedule(learning_rate),
                           use_value=False, activations=True)
    # the activations leave the step whole and their statistics are taken on the host: fusing
    # the reductions into the step makes XLA's compilation several times slower
    step = jax.jit(step) if jit else step
    state = new_state(params, tx)
    out = []
    for _ in range(steps + 1):
        state, m = step(state, {"ids": ids})
        out.append((float(m["loss"]), {k: _host_stats(v) for k, v in
                                       jax.device_get(m["activations"]).items()}))
    return out


def _host_stats(x) -> dict:
    x = np.abs(np.asarray(x, np.float64))
    return {"mean_abs": float(np.mean(x)), "rms": float(np.sqrt(np.mean(np.square(x))))}


def coord_check(parametrizations: Sequence[str] = ("umup", "mup", "sp"),
                widths: Sequence[int] = WIDTHS, steps: int = STEPS, *,
                learning_rates: Optional[dict] = None, batch_size: int = 8, seq_len: int = 32,
                config: Optional[TransformerConfig] = None, d_head: int = 16, seed: int = 0,
                model_fn: Optional[Callable[[str, int], nnx.Module]] = None,
                optimizer: Optional[Callable[[str, float, nnx.Module], Any]] = None,
                jit: bool = True, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Mean |x| and RMS of every tapped op after ``0..steps`` updates, per width and
    parametrization.

    Args:
      parametrizations: any of ``"umup"``, ``"mup"``, ``"sp"`` (with the default optimizer).
      widths: model widths (``d_model``); default ``WIDTHS`` (64 ... 2048), a quicker check
        ``QUICK_WIDTHS``.
      steps: number of updates ``k`` (records for steps ``0..k``).
      learning_rates: ``{parametrization: lr}``; default ``LEARNING_RATES``.
      batch_size: rows of the fixed random batch (token ids in ``[0, vocab_size)``).
      seq_len: tokens per row of that batch.
      config: base ``TransformerConfig`` of the default model (``d_model``, ``n_heads``,
        ``parametrization`` and ``scan_layers`` are replaced); default: 2 layers, vocab 256,
        SP init std ``fan_in^-1/2`` (see ``default_model``).
      d_head: head width of the default model (heads = width / d_head).
      seed: model init and data seed (the same for every width).
      model_fn: ``(parametrization, width) -> model`` instead of the default decoder; the
        model needs a ``loss(ids)`` method, no state but ``nnx.Param`` and unscanned taps.
      optimizer: ``(parametrization, lr, model) -> optax transform``; default
        ``default_optimizer``.
      jit: compile each training step.
      progress: optional callback receiving one line per finished model.

    Returns:
      Records ``{"parametrization", "width", "step", "index", "name", "mean_abs", "rms",
      "loss", "learning_rate"}``, ``index``/``name`` as in ``track_scales`` (forward order).
    """
    widths = [int(w) for w in widths]
    if not widths or min(widths) < 1:
        raise ValueError(f"coord_check: widths must be positive ints, got {widths}.")
    if int(steps) < 0:
        raise ValueError(f"coord_check: steps must be >= 0, got {steps}.")
    lrs = dict(LEARNING_RATES, **(learning_rates or {}))
    optimizer = optimizer or default_optimizer
    records = []
    for p in parametrizations:
        if p not in lrs:
            raise ValueError(f"coord_check: no learning rate for {p!r}; "
                             f"pass learning_rates={{{p!r}: ...}}.")
        for w in widths:
            model = (model_fn(p, w) if model_fn else
                     default_model(p, w, config=config, d_head=d_head, seed=seed))
            vocab = model.config.vocab_size
            ids = jax.random.randint(jax.random.key(seed + 1), (batch_size, seq_len), 0, vocab)
            history = _run(model, optimizer(p, lrs[p], model), ids, int(steps), jit, lrs[p])
            keys = list(history[0][1])
            names = naming.op_names(keys)
            for t, (loss, stats) in enumerate(history):
                for i, (k, name) in enumerate(zip(keys, names)):
                    records.append({"parametrization": p, "width": w, "step": t, "index": i,
                                    "name": name, **stats[k], "loss": loss,
                                    "learning_rate": lrs[p]})
            if progress:
                progress(f"coord_check {p} width {w}: "
                         f"loss {history[0][0]:.3f} -> {history[-1][0]:.3f}")
    return records


def _check_stat(stat: str) -> str:
    if stat not in STATS:
        raise ValueError(f"coord_check: stat must be one of {STATS}, got {stat!r}.")
    return stat


def _curves(records: Sequence[dict], stat: str) -> dict[tuple, list]:
    """``(parametrization, step, index, name) -> [(width, value), ...]``."""
    _check_stat(stat)
    curves: dict[tuple, list] = {}
    for r in records:
        curves.setdefault((r["parametrization"], int(r["step"]), r["index"], r["name"]),
                          []).append((r["width"], float(r[stat])))
    return curves


def _slope(pts) -> float:
    x = [math.log2(w) for w, _ in pts]
    y = [math.log2(max(v, 1e-30)) for _, v in pts]
    return float(np.polyfit(x, y, 1)[0])


def width_slopes(records: Sequence[dict], stat: str = "mean_abs") -> list[dict]:
    """Least-squares slope of ``log2(stat)`` against ``log2(width)`` per curve.

    A slope of 0 is a flat curve; 1 means the statistic doubles with each doubling of width.

    Args:
      records: from ``coord_check``.
      stat: ``"mean_abs"`` or ``"rms"`` (``STATS``).

    Returns:
      ``{"parametrization", "step", "name", "slope"}`` per (parametrization, step, op) with
      at least two widths.
    """
    return [{"parametrization": p, "step": t, "name": name, "slope": _slope(pts)}
            for (p, t, _, name), pts in _curves(records, stat).items()
            if len({w for w, _ in pts}) >= 2]


def width_ratios(records: Sequence[dict], step: Optional[int] = None,
                 stat: str = "mean_abs") -> list[dict]:
    """Per module and parametrization: how much the statistic moves across widths at a step.

    ``ratio = max / min`` of the statistic over the widths (1 is perfectly flat; TP5's claim
    for muP is that it stays bounded as the width grows, SP's grows with the width range) and
    ``slope`` as in ``width_slopes`` (its sign says whether the curve rises or falls).

    Args:
      records: from ``coord_check`` (or ``read_csv`` of its CSV).
      step: the step (updates made); default the last recorded one.
      stat: ``"mean_abs"`` or ``"rms"``.

    Returns:
      ``{"parametrization", "step", "index", "name", "ratio", "slope", "min", "max",
      "min_width", "max_width", "widths"}`` per (parametrization, op) with at least two
      widths, in the records' order.

    Raises:
      ValueError: no records, an unknown ``stat``, or no records at ``step``.
    """
    records = list(records)
    if not records:
        raise ValueError("width_ratios: no records (run coord_check first).")
    if step is None:
        step = max(int(r["step"]) for r in records)
    curves = {k: v for k, v in _curves(records, stat).items() if k[1] == int(step)}
    if not curves:
        raise ValueError(f"width_ratios: no records at step {step}; steps recorded: "
                         f"{sorted({int(r['step']) for r in records})}.")
    out = []
    for (p, t, i, name), pts in curves.items():
        if len({w for w, _ in pts}) < 2:
            continue
        (w_lo, lo), (w_hi, hi) = min(pts, key=lambda q: q[1]), max(pts, key=lambda q: q[1])
        out.append({"parametrization": p, "step": t, "index": i, "name": name,
                    "ratio": hi / max(lo, 1e-30), "slope": _slope(pts), "min": lo, "max": hi,
                    "min_width": w_lo, "max_width": w_hi, "widths": len(pts)})
    return out


def ratio_table(ratios: Sequence[dict], stat: str = "mean_abs") -> str:
    """``width_ratios`` as a text table: a row per module, ``ratio (slope)`` per
    parametrization, and a last row with each parametrization's largest ratio."""
    pars = list(dict.fromkeys(r["parametrization"] for r in ratios))
    names = list(dict.fromkeys(r["name"] for r in sorted(ratios, key=lambda r: r["index"])))
    cell = {(r["parametrization"], r["name"]): f"{r['ratio']:6.2f} ({r['slope']:+.2f})"
            for r in ratios}
    width = max([len(n) for n in names] + [len("largest ratio")])
    step = ratios[0]["step"] if ratios else "?"
    lines = [f"coordinate check, step {step}: max/min of {stat} across widths (slope vs width)",
             " " * width + "".join(f"  {p:>14s}" for p in pars)]
    for n in names:
        lines.append(f"{n:<{width}s}" + "".join(f"  {cell.get((p, n), '-'):>14s}" for p in pars))
    worst = {p: max(r["ratio"] for r in ratios if r["parametrization"] == p) for p in pars}
    lines.append(f"{'largest ratio':<{width}s}" + "".join(f"  {worst[p]:14.2f}" for p in pars))
    return "\n".join(lines)


def _pow2_label(x) -> str:
    if isinstance(x, (int, float)) and x > 0 and math.log2(x).is_integer():
        return f"2^{int(math.log2(x))}"
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


DEFAULT_PLOTTED = ("embed", "attn.proj", "mlp.act", "mlp.out", "mlp.resid", "logits")


def plot_coord_check(records: Sequence[dict], path: str, *, names: Optional[Sequence[str]] = None,
                     steps: Optional[Sequence[int]] = None, stat: str = "mean_abs",
                     lines: str = "name", title: str = "", dpi: int = 110) -> str:
    """Draws ``coord_check`` records: the statistic against width, both axes log2.

    ``lines="name"``: one panel per (parametrization, step), rows parametrizations, columns
    steps, a line per module, the y axis shared. ``lines="step"``: the figure of TP5's
    coordinate checks, one panel per (parametrization, module), a line per step (darker is
    later), the y axis shared down each column (one module). Either way a flat curve is
    width-independent (u-muP, muP) and a rising one grows with width (SP).

    Args:
      records: from ``coord_check`` (or ``read_csv`` of its CSV).
      path: output image.
      names: op names to draw; default those ending in ``DEFAULT_PLOTTED`` (embedding, each
        layer's attention and MLP outputs, the MLP activation and block output, logits).
      steps: steps to draw; default up to 5 spread over ``0..k`` (``lines="name"``) or every
        step (``lines="step"``).
      stat: ``"mean_abs"`` or ``"rms"``.
      lines: ``"name"`` or ``"step"`` (see above).
      title: figure title.
      dpi: resolution.

    Returns:
      ``path``.
    """

    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_stat(stat)
    if lines not in ("name", "step"):
        raise ValueError(f"plot_coord_check: lines must be 'name' or 'step', got {lines!r}.")
    records = list(records)
    if not records:
        raise ValueError("plot_coord_check: no records (run coord_check first).")
    params = list(dict.fromkeys(r["parametrization"] for r in records))
    all_steps = sorted({int(r["step"]) for r in records})
    if steps is None:
        steps = (sorted({all_steps[round(i * (len(all_steps) - 1) / 4)] for i in range(5)})
                 if len(all_steps) > 5 and lines == "name" else all_steps)
    order = {}
    for r in records:
        order.setdefault(r["name"], r["index"])
    if names is None:
        names = [n for n in order if n == "embed" or n == "logits"
                 or n.endswith(tuple("." + s for s in DEFAULT_PLOTTED))]
    names = sorted(set(names), key=lambda n: order.get(n, 0))
    missing = [n for n in names if n not in order]
    if missing:
        raise ValueError(f"plot_coord_check: no records for {missing}; known names: {list(order)}.")
    curves = _curves(records, stat)
    by_key = {(p, t, n): sorted(pts) for (p, t, _, n), pts in curves.items()}
    label = {"mean_abs": "mean |activation|", "rms": "activation RMS"}[stat]
    cols, series = (steps, names) if lines == "name" else (names, steps)
    fig = Figure(figsize=(2.9 * len(cols) + 1.9, 2.6 * len(params) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(params), len(cols), squeeze=False, sharex=True,
                        sharey=True if lines == "name" else "col")
    if lines == "step":
        cmap = matplotlib.colormaps["viridis"]
        colors = {t: cmap(0.9 - 0.9 * i / max(1, len(series) - 1)) for i, t in enumerate(series)}
    elif len(series) <= 10:
        colors = {n: matplotlib.colormaps["tab10"](i) for i, n in enumerate(series)}
    else:
        cmap = matplotlib.colormaps["viridis"]
        colors = {n: cmap(i / max(1, len(series) - 1) * 0.9) for i, n in enumerate(series)}
    handles = {}
    for i, p in enumerate(params):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            for v in series:
                t, n = (c, v) if lines == "name" else (v, c)
                pts = by_key.get((p, int(t), n))
                if pts:
                    w, y = zip(*pts)
                    handles[v], = ax.plot(w, y, marker=".", color=colors[v], lw=1.3)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.grid(True, which="major", alpha=0.3)
            if i == 0:
                ax.set_title(f"step {c}" if lines == "name" else c, fontsize=10)
            if j == 0:
                lr = next(r.get("learning_rate") for r in records if r["parametrization"] == p)
                ax.set_ylabel(f"{p} (lr {_pow2_label(lr)})\n{label}", fontsize=9)
            if i == len(params) - 1:
                ax.set_xlabel("width")
    shown = [v for v in series if v in handles]
    fig.legend([handles[v] for v in shown], [f"step {v}" if lines == "step" else v for v in shown],
               loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or f"Coordinate check: {label} vs width after t steps", fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
