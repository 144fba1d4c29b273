"""The PNGs of a run (matplotlib, Agg backend: no display): the loss curves written at the end
of a run and the confusion matrix of a classification evaluation."""

from __future__ import annotations

import os
from pathlib import Path

from unitscale_jax.train.metrics import loss_curve, read_metrics


def _ema(values: list[float], alpha: float) -> list[float]:
    """Debiased exponential moving average (as TensorBoard's smoothing)."""
    out, acc = [], 0.0
    for i, v in enumerate(values, 1):
        acc = alpha * acc + (1 - alpha) * v
        out.append(acc / (1 - alpha ** i))
    return out


def plot_losses(metrics_path: str | os.PathLike, out_path: str | os.PathLike, *,
                title: str = "") -> Path:
    """Training loss (raw and smoothed) and validation loss against step; bits per byte on a
    second panel when recorded. Returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = loss_curve(rows, "train")
    val = loss_curve(rows, "validation")
    bpb = loss_curve(rows, "validation", "bits_per_byte")
    fig, axes = plt.subplots(1, 2 if bpb else 1, figsize=(11 if bpb else 6.5, 4), squeeze=False)
    ax = axes[0, 0]
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train")
        if len(losses) > 10:
            ax.plot(steps, _ema(list(losses), 0.9 if len(losses) >= 200 else 0.6),
                    color="tab:blue", lw=1.5, label="train (smoothed)")
    if val:
        ax.plot(*zip(*val), "o-", color="tab:orange", lw=1.5, ms=4, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    if bpb:
        ax2 = axes[0, 1]
        ax2.plot(*zip(*bpb), "o-", color="tab:green", lw=1.5, ms=4)
        ax2.set_xlabel("step")
        ax2.set_ylabel("validation bits per byte")
        ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, out_path)


def plot_confusion(matrix, labels, out_path: str | os.PathLike, *, title: str = "") -> Path:
    """A confusion-matrix PNG: rows true class, columns predicted, colour = share of the row,
    each cell annotated with its count. Returns the PNG path."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np

    counts = np.asarray(matrix, np.int64)
    n = len(labels)
    if counts.shape != (n, n):
        raise ValueError(f"a confusion matrix of {n} labels must be [{n}, {n}], got "
                         f"{list(counts.shape)}.")
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    size = min(2.0 + 0.6 * n, 16.0)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(n), [str(x) for x in labels], rotation=45 if n > 4 else 0, ha="right"
                  if n > 4 else "center")
    ax.set_yticks(range(n), [str(x) for x in labels])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    return _save(fig, out_path)


def _save(fig, out_path: str | Path) -> Path:
    """Lays out, writes (110 dpi) and closes ``fig``; returns the path."""
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return out
