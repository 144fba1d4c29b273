"""The loss-curve PNG written at the end of a run (matplotlib, Agg backend: no display)."""

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
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
