"""Training curves: loss and top-1 per epoch for train and validation, plus the learning rate."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from probe.output.plots import new_figure, save_png, wrap


def plot_history(history: list[dict], path: str | Path, title: str = "", best_epoch: int | None = None) -> Path:
    """Write history_figure as a PNG (atomically); returns path."""
    return save_png(history_figure(history, title, best_epoch), path, dpi=100)


def history_figure(history: list[dict], title: str = "", best_epoch: int | None = None) -> Figure:
    """Loss, top-1 (train and validation) and learning-rate panels, one point per epoch."""
    epochs = [h["epoch"] for h in history]
    fig = new_figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 3)
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
        fig.suptitle(wrap(title, 12.5, 12))
    fig.tight_layout()
    return fig
