"""PNG charts (matplotlib Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib import ticker  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion(matrix, classes, path, title: str = "") -> Path:
    """Row-normalised confusion matrix as a heat map; cell values printed for up to 15 classes."""
    m = np.asarray(matrix, dtype=float)
    n = len(m)
    size = min(12.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    if n <= 40:
        ax.set_xticks(range(n), classes, rotation=90 if n > 6 else 0, fontsize=8)
        ax.set_yticks(range(n), classes, fontsize=8)
    if n <= 15:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def plot_comparison(rows: list[dict], path, title: str = "") -> Path:
    """Two panels: test top-1 and fit seconds (log scale) per row; rows need label, top1, seconds."""
    labels = [r["label"] for r in rows]
    top1 = [100 * (r.get("top1") or 0) for r in rows]
    secs = [max(r.get("seconds") or 0, 1e-3) for r in rows]
    y = np.arange(len(rows))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 1.2 + 0.38 * len(rows)), sharey=True)
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
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
