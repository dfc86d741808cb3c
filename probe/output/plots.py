"""PNG charts drawn on plain matplotlib Figures and saved through the Agg canvas: no pyplot, no
backend switch, so importing this never changes the plotting setup of the program that imports it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay

from extract.core.atomic import atomic_path, write_errors


def plot_confusion(matrix, classes, path, title: str = "") -> Path:
    """Write confusion_figure as a PNG; returns path."""
    return save_png(confusion_figure(matrix, classes, title), path)


def confusion_figure(matrix, classes, title: str = "") -> Figure:
    """Row-normalised confusion matrix as a heat map; cell values printed for up to 15 classes."""
    m = np.asarray(matrix, dtype=float)
    n = len(m)
    size = min(12.0, 2.5 + 0.45 * n)
    fig = new_figure(figsize=(size, size * 0.9))
    ax = fig.add_subplot()
    disp = ConfusionMatrixDisplay(m, display_labels=list(classes)).plot(
        ax=ax, cmap="Blues", include_values=n <= 15, values_format=".2f",
        xticks_rotation="vertical" if n > 6 else "horizontal", im_kw={"vmin": 0, "vmax": 1}, text_kw={"fontsize": 7})
    disp.im_.colorbar.set_label("fraction of true class")
    if n > 40:  # too many to read: an unlabelled heat map
        ax.set_xticks([])
        ax.set_yticks([])
    ax.tick_params(labelsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_comparison(rows: list[dict], path, title: str = "") -> Path:
    """Write comparison_figure as a PNG; returns path."""
    return save_png(comparison_figure(rows, title), path)


def comparison_figure(rows: list[dict], title: str = "") -> Figure:
    """Two panels: test top-1 and fit seconds (log scale) per row; rows need label, top1, seconds."""
    labels = [r["label"] for r in rows]
    top1 = [100 * (r.get("top1") or 0) for r in rows]
    secs = [max(r.get("seconds") or 0, 1e-3) for r in rows]
    y = np.arange(len(rows))
    fig = new_figure(figsize=(11, 1.2 + 0.38 * len(rows)))
    a, b = fig.subplots(1, 2, sharey=True)
    a.barh(y, top1, color="tab:blue")
    a.set_yticks(y, labels, fontsize=8)
    a.invert_yaxis()
    a.set_xlabel("test top-1 (%)")
    lo = min(top1) if top1 else 0
    a.set_xlim(max(0, lo - 10), 100)
    for i, v in enumerate(top1):
        a.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    b.barh(y, secs, color="tab:orange")
    b.set_xscale("log")
    b.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    b.xaxis.set_minor_formatter(ticker.NullFormatter())
    b.set_xlabel("fit seconds (search + refit, log)")
    for i, v in enumerate(secs):
        b.text(v, i, f" {v:.2g}", va="center", fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def new_figure(**kwargs) -> Figure:
    """A Figure (kwargs as for Figure) drawn by its own Agg canvas, outside pyplot's figure manager."""
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path, dpi: int = 110) -> Path:
    """Render fig with the Agg canvas and write it to path as a PNG, atomically; returns path."""
    path = Path(path)
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    with write_errors(path), atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return path
