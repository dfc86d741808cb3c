"""Training curves: loss and top-1 per epoch for train and validation, plus the learning rate."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_history(history: list[dict], path: str | Path, title: str = "", best_epoch: int | None = None) -> Path:
    """Write a PNG with loss, accuracy and lr panels; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "top1", "top-1 accuracy")):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", ls=":", label=f"best (epoch {best_epoch})")
        ax.legend()
    axes[2].plot(epochs, [h["lr"] for h in history], "o-")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("base learning rate (end of epoch)")
    axes[2].grid(alpha=0.3)
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
