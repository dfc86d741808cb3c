"""PNG charts drawn on plain matplotlib Figures and saved through the Agg canvas: no pyplot, no
backend switch, so importing this never changes the plotting setup of the program that imports it."""

from __future__ import annotations

import textwrap
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
    """Row-normalised confusion matrix as a heat map; cell values printed for up to 15 classes.
    Class names are wrapped (or cut) to fit their cells, the title to the figure's width."""
    m = np.asarray(matrix, dtype=float)
    n = len(m)
    size = min(12.0, 2.5 + 0.45 * n)
    fig = new_figure(figsize=(size, size * 0.9), layout="constrained")
    classes = [fit_label(str(c), 22 if n > 6 else max(6, int(min(4.5 * size, 9 * size / n))), 1 if n > 6 else 2)
               for c in classes]
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
    ax.set_title(wrap(title, 0.8 * size, 9), fontsize=9)
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
        b.text(v, i, f" {plain(v)}", va="center", fontsize=7)
    b.margins(x=0.2)
    fig.suptitle(wrap(title, 10.5, 10), fontsize=10)
    fig.tight_layout()
    return fig


def plain(value: float) -> str:
    """A number as people write it, never in e-notation: 12346, 850, 12.3, 0.42, 0.004, 0.0012."""
    v = abs(value)
    if v >= 100 or v == 0:
        return f"{value:.0f}"
    if v >= 10:
        return f"{value:.1f}"
    if v >= 0.1:
        return f"{value:.2f}"
    digits = max(2, 1 - int(np.floor(np.log10(v))))
    return f"{value:.{digits}f}".rstrip("0")


def wrap(text: str, width_inches: float, fontsize: float) -> str:
    """`text` with each line wrapped to about width_inches at fontsize (DejaVu Sans: ~0.6 em a character)."""
    chars = max(10, int(width_inches * 72 / (0.6 * fontsize)))
    return "\n".join(textwrap.fill(line, chars, break_long_words=True) if line else "" for line in text.split("\n"))


def fit_label(label: str, chars: int, lines: int = 1) -> str:
    """A tick label wrapped to `chars` a line, at most `lines` lines, the rest cut with an ellipsis
    (the full name stays in the JSON)."""
    parts = textwrap.wrap(label, chars, break_long_words=True) or [""]
    if len(parts) > lines:
        parts = parts[:lines]
        parts[-1] = parts[-1][:chars - 1] + "…"
    return "\n".join(parts)


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
