"""``plot_scales``: the scale-tracking figure (after ``unit_scaling.analysis.plot``).

One row per tensor in forward order (each weight just before the op it feeds), the chosen
statistic on a log2 x axis, forward values (op outputs, weights) and backward values
(gradients flowing into op outputs, weight gradients) in two colours, weights as
triangles, a faint bar from the statistic to the tensor's max |x|, and vertical lines at
the limits of FP16, E4M3 (OCP, max 448) and E5M2: smallest subnormal (dotted), smallest
normal (dashed) and largest finite value (solid). Drawn with matplotlib's Agg canvas
(no pyplot state, no display needed).
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from unitscale_jax.analysis.stats import FORMATS
from unitscale_jax.precision.formats import FloatFormat

COLORS = {"fwd": "#0173b2", "bwd": "#de8f05"}  # seaborn "colorblind" blue / orange
LIGHT = {"fwd": "#9cc3e0", "bwd": "#f0c98a"}
FORMAT_COLORS = ("#555555", "#cc3311", "#7a4eab")
KIND_STYLE = {  # kind -> (direction, marker, label)
    "fwd": ("fwd", "o", "op output (forward)"),
    "bwd": ("bwd", "o", "gradient into op (backward)"),
    "weight": ("fwd", "^", "weight"),
    "weight_grad": ("bwd", "^", "weight gradient"),
}
METRICS = ("rms", "std", "mean_abs", "max_abs")


def format_lines(formats: Sequence[FloatFormat] = FORMATS) -> list[tuple[float, str, str, str]]:
    """``(x, label, color, linestyle)`` for each format's min subnormal, min normal and max."""
    lines = []
    for fmt, color in zip(formats, FORMAT_COLORS * 3):
        name = fmt.name.upper()
        lines += [(fmt.min_subnormal, f"{name} min subnormal", color, ":"),
                  (fmt.min_normal, f"{name} min normal", color, "--"),
                  (fmt.max, f"{name} max", color, "-")]
    return lines


def _label_groups(lines) -> list[tuple[float, str, str]]:
    """Merges the labels of lines closer than a factor 1.3: ``(x, label, color)``."""
    groups: list[list] = []
    for line in sorted(lines, key=lambda l: l[0]):
        if groups and line[0] / groups[-1][-1][0] < 1.3:
            groups[-1].append(line)
        else:
            groups.append([line])
    out = []
    for g in groups:
        names = [l[1].split(" ", 1) for l in g]
        if len({rest for _, rest in names}) == 1:
            label = ", ".join(n for n, _ in names) + " " + names[0][1]
        else:
            label = " / ".join(l[1] for l in g)
        out.append((g[0][0], label, g[0][2] if len(g) == 1 else "#333333"))
    return out


def _rows(records: Sequence[dict]) -> list[str]:
    first: dict[str, int] = {}
    for r in records:
        first.setdefault(r["name"], r.get("index", len(first)))
    return sorted(first, key=lambda n: first[n])


def plot_scales(records: Sequence[dict], path: str, *, metric: str = "rms", title: str = "",
                formats: Sequence[FloatFormat] = FORMATS, show_max: bool = True,
                dpi: int = 110) -> str:
    """Draws the scale figure of ``track_scales`` records to ``path`` (PNG, SVG, PDF...).

    Args:
      records: rows from ``track_scales`` (or ``read_csv`` of its CSV).
      path: output image file (parent folders created).
      metric: the x value: ``"rms"`` (default), ``"std"``, ``"mean_abs"`` or ``"max_abs"``.
      title: figure title.
      formats: formats whose limits are drawn.
      show_max: a faint bar from the metric to max |x|.
      dpi: resolution.

    Returns:
      ``path``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if metric not in METRICS:
        raise ValueError(f"plot_scales: metric must be one of {METRICS}, got {metric!r}.")
    records = list(records)
    if not records:
        raise ValueError("plot_scales: no records (run track_scales first).")
    unknown = {r.get("kind") for r in records} - set(KIND_STYLE)
    if unknown:
        raise ValueError(f"plot_scales: unknown record kind(s) {sorted(map(str, unknown))}; "
                         f"expected {list(KIND_STYLE)}.")
    rows = _rows(records)
    y_of = {n: i for i, n in enumerate(rows)}
    fig = Figure(figsize=(11, 2.6 + 0.24 * len(rows)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)

    xs = []
    for r in records:
        direction, marker, _ = KIND_STYLE[r["kind"]]
        x = r.get(metric)
        if x is None or not x > 0 or not math.isfinite(x):
            continue
        y = y_of[r["name"]] + (-0.13 if direction == "fwd" else 0.13)
        xs.append(x)
        if show_max and r.get("max_abs") and r["max_abs"] > x:
            ax.plot([x, r["max_abs"]], [y, y], color=LIGHT[direction], lw=1.2, zorder=1)
            ax.plot([r["max_abs"]] * 2, [y - 0.15, y + 0.15], color=LIGHT[direction], lw=1.2,
                    zorder=1)
            xs.append(r["max_abs"])
        ax.plot([x], [y], marker=marker, ms=6.5 if marker == "^" else 5.5, ls="",
                color=COLORS[direction], mec="black" if marker == "^" else COLORS[direction],
                mew=0.6, zorder=3)

    lines = format_lines(formats)
    lo = min(xs + [l[0] for l in lines]) / 4
    hi = max(xs + [l[0] for l in lines]) * 4
    ax.set_xscale("log", base=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    top = ax.get_xaxis_transform()
    for x, _, color, ls in lines:
        ax.axvline(x, color=color, ls=ls, lw=1.0, zorder=0)
    for x, label, color in _label_groups(lines):
        ax.text(x, 1.005, label, transform=top, rotation=90, ha="center", va="bottom",
                fontsize=7, color=color)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=8)
    for i in range(len(rows)):
        if i % 2 == 0:
            ax.axhspan(i - 0.5, i + 0.5, color="#f2f2f2", zorder=-1, lw=0)
    lo_e, hi_e = math.ceil(math.log2(lo)), math.floor(math.log2(hi))
    step = max(1, (hi_e - lo_e) // 12)
    ax.set_xticks([2.0**e for e in range(lo_e, hi_e + 1) if e % step == 0])
    ax.set_xlabel(f"{metric} (log2 scale)")
    handles = [Line2D([], [], marker=m, ls="", color=COLORS[d],
                      mec="black" if m == "^" else COLORS[d], label=lab)
               for d, m, lab in KIND_STYLE.values()]
    if show_max:
        handles.append(Line2D([], [], color="#bbbbbb", label="... up to max |x|"))
    if title:
        fig.suptitle(title, fontweight="bold")
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight(), 1, 1))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
