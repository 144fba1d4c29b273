"""Coordinate check: activation RMS per layer after 0..k steps, across widths.

The test of Yang et al. (Tensor Programs V, arXiv 2203.03466, section 8 / appendix D.1):
train models of growing width for a few steps at a high learning rate and record the size
of every activation. In a parametrization with a width-independent update (muP, u-muP) the
curves of RMS against width stay flat at every step; in the standard parametrization (SP,
here with plain Adam at one learning rate for every tensor) the hidden activations grow
with width once training starts, because an Adam step changes each of ``fan_in`` weights
by about ``lr`` and the change of the output adds up ``fan_in`` aligned terms.

u-muP is trained with ``unitscale_jax.optim.adam`` (per-tensor factors ``fan_in^-1/2``,
``depth^-1/2``; Blake et al., 2025, table 2), SP with ``optax.adam``. The data is a fixed
batch of random token ids (the model memorises it, which makes updates as aligned as they
get). Activations are those tapped by the models (``unitscale_jax.nn.tap``), measured on the
training batch in the forward pass of each step; step ``t`` means after ``t`` updates.
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

WIDTHS = (64, 128, 256, 512, 1024)
QUICK_WIDTHS = (64, 128, 256, 512)
LEARNING_RATES = {"umup": 2.0**1, "sp": 2.0**-6}
"""High learning rates: twice u-muP's usual optimum (2^0), ~4x SP's optimum at width 128."""


def default_optimizer(parametrization: str, learning_rate: float, model: nnx.Module
                      ) -> optax.GradientTransformation:
    """u-muP: ``unitscale_jax.optim.adam(lr, param_info=model)``; SP: ``optax.adam(lr)``."""
    p = nn.get_parametrization(parametrization)
    if p.unit_scaled:
        from unitscale_jax.optim import adam
        return adam(learning_rate, param_info=nn.param_info(model))
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
    # the activations leave the step whole and their RMS is taken on the host: fusing the
    # reductions into the step makes XLA's compilation several times slower
    step = jax.jit(step) if jit else step
    state = new_state(params, tx)
    out = []
    for _ in range(steps + 1):
        state, m = step(state, {"ids": ids})
        rms = {k: float(np.sqrt(np.mean(np.square(np.asarray(v, np.float64)))))
               for k, v in jax.device_get(m["activations"]).items()}
        out.append((float(m["loss"]), rms))
    return out


def coord_check(parametrizations: Sequence[str] = ("umup", "sp"),
                widths: Sequence[int] = QUICK_WIDTHS, steps: int = 4, *,
                learning_rates: Optional[dict] = None, batch_size: int = 8, seq_len: int = 32,
                config: Optional[TransformerConfig] = None, d_head: int = 16, seed: int = 0,
                model_fn: Optional[Callable[[str, int], nnx.Module]] = None,
                optimizer: Optional[Callable[[str, float, nnx.Module], Any]] = None,
                jit: bool = True, progress: Optional[Callable[[str], None]] = None) -> list[dict]:
    """Activation RMS of every tapped op after ``0..steps`` updates, per width and parametrization.

    Args:
      parametrizations: e.g. ``("umup", "sp")``.
      widths: model widths (``d_model``); the full check uses ``WIDTHS`` (64 ... 1024).
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
      Records ``{"parametrization", "width", "step", "index", "name", "rms", "loss",
      "learning_rate"}``, ``index``/``name`` as in ``track_scales`` (forward order).
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
            for t, (loss, rms) in enumerate(history):
                for i, (k, name) in enumerate(zip(keys, names)):
                    records.append({"parametrization": p, "width": w, "step": t, "index": i,
                                    "name": name, "rms": rms[k], "loss": loss,
                                    "learning_rate": lrs[p]})
            if progress:
                progress(f"coord_check {p} width {w}: "
                         f"loss {history[0][0]:.3f} -> {history[-1][0]:.3f}")
    return records


def width_slopes(records: Sequence[dict]) -> list[dict]:
    """Least-squares slope of ``log2(rms)`` against ``log2(width)`` per curve.

    A slope of 0 is a flat curve; 1 means the RMS doubles with each doubling of width.

    Returns:
      ``{"parametrization", "step", "name", "slope"}`` per (parametrization, step, op).
    """
    curves: dict[tuple, list] = {}
    for r in records:
        curves.setdefault((r["parametrization"], r["step"], r["index"], r["name"]), []).append(
            (math.log2(r["width"]), math.log2(max(r["rms"], 1e-30))))
    out = []
    for (p, t, _, name), pts in curves.items():
        if len({x for x, _ in pts}) < 2:
            continue
        x, y = np.array(pts).T
        out.append({"parametrization": p, "step": t, "name": name,
                    "slope": float(np.polyfit(x, y, 1)[0])})
    return out


def _pow2_label(x) -> str:
    if isinstance(x, (int, float)) and x > 0 and math.log2(x).is_integer():
        return f"2^{int(math.log2(x))}"
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


DEFAULT_PLOTTED = ("embed", "attn.proj", "mlp.act", "mlp.out", "mlp.resid", "logits")


def plot_coord_check(records: Sequence[dict], path: str, *, names: Optional[Sequence[str]] = None,
                     steps: Optional[Sequence[int]] = None, title: str = "", dpi: int = 110) -> str:
    """Draws ``coord_check`` records: RMS against width, one panel per (parametrization, step).

    Rows are parametrizations, columns steps; both axes log2 and the y axis shared, so a
    flat curve is width-independent (u-muP) and a rising one grows with width (SP).

    Args:
      records: from ``coord_check`` (or ``read_csv`` of its CSV).
      path: output image.
      names: op names to draw; default those ending in ``DEFAULT_PLOTTED`` (embedding, each
        layer's attention and MLP outputs, the MLP activation and block output, logits).
      steps: steps to draw (columns); default up to 5 spread over ``0..k``.
      title: figure title.
      dpi: resolution.

    Returns:
      ``path``.
    """

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = list(records)
    if not records:
        raise ValueError("plot_coord_check: no records (run coord_check first).")
    params = list(dict.fromkeys(r["parametrization"] for r in records))
    all_steps = sorted({int(r["step"]) for r in records})
    if steps is None:
        steps = sorted({all_steps[round(i * (len(all_steps) - 1) / 4)] for i in range(5)}
                       if len(all_steps) > 5 else all_steps)
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
    fig = Figure(figsize=(2.9 * len(steps) + 1.9, 2.6 * len(params) + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(params), len(steps), squeeze=False, sharex=True, sharey=True)
    import matplotlib
    if len(names) <= 10:
        colors = {n: matplotlib.colormaps["tab10"](i) for i, n in enumerate(names)}
    else:
        cmap = matplotlib.colormaps["viridis"]
        colors = {n: cmap(i / max(1, len(names) - 1) * 0.9) for i, n in enumerate(names)}
    lines = {}
    for i, p in enumerate(params):
        for j, t in enumerate(steps):
            ax = axes[i][j]
            for n in names:
                pts = sorted((r["width"], r["rms"]) for r in records
                             if r["parametrization"] == p and int(r["step"]) == t
                             and r["name"] == n)
                if pts:
                    w, v = zip(*pts)
                    lines[n], = ax.plot(w, v, marker=".", color=colors[n], lw=1.3, label=n)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.grid(True, which="major", alpha=0.3)
            if i == 0:
                ax.set_title(f"step {t}", fontsize=10)
            if j == 0:
                lr = next(r.get("learning_rate") for r in records if r["parametrization"] == p)
                ax.set_ylabel(f"{p} (lr {_pow2_label(lr)})\nactivation RMS", fontsize=9)
            if i == len(params) - 1:
                ax.set_xlabel("width")
    fig.legend([lines[n] for n in names if n in lines], [n for n in names if n in lines],
               loc="center right", fontsize=8, frameon=False)
    fig.suptitle(title or "Coordinate check: activation RMS vs width after t steps",
                 fontweight="bold")
    fig.tight_layout(rect=(0, 0, 1 - 1.7 / fig.get_figwidth(), 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
