"""Plots leave matplotlib's global state alone and write PNGs that decode, at the size asked for."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.plot import history_figure, plot_history
from probe.output.plots import comparison_figure, confusion_figure, plot_comparison, plot_confusion

REPO = Path(__file__).resolve().parents[1]
HISTORY = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_top1": 0.5 + e / 10,
            "val_top1": 0.4 + e / 10, "lr": 0.1 / e} for e in (1, 2, 3)]


def _confusion(n: int) -> np.ndarray:
    return np.random.default_rng(n).dirichlet(np.ones(n), size=n)


@pytest.mark.slow
def test_plotting_does_not_touch_the_backend_or_pyplot(tmp_path):
    # svg: a backend the caller chose that is not Agg, so a matplotlib.use("Agg") anywhere shows up
    code = (
        "import sys, matplotlib\n"
        "before = matplotlib.get_backend()\n"
        "import probe.output.plots, finetune.plot\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "probe.output.plots.plot_confusion([[1, 0], [0.5, 0.5]], ['a', 'b'], sys.argv[1] + '/c.png')\n"
        f"finetune.plot.plot_history({HISTORY!r}, sys.argv[1] + '/h.png')\n"
        "assert matplotlib.get_backend() == before, (before, matplotlib.get_backend())\n"
        "print(before)\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "svg"
    assert (tmp_path / "c.png").stat().st_size > 0 and (tmp_path / "h.png").stat().st_size > 0


def _png(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.verify()
    im = Image.open(path)
    assert im.format == "PNG"
    im.load()
    return im


@pytest.mark.parametrize("n", [3, 12, 60])
def test_confusion_png_decodes_at_its_size(tmp_path, n):
    path = plot_confusion(_confusion(n), [f"class {i}" for i in range(n)], tmp_path / "c.png", title="t")
    im = _png(path)
    side = min(12.0, 2.5 + 0.45 * n) * 110
    assert im.size == pytest.approx((side, side * 0.9), abs=2)
    assert len(im.convert("RGB").getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, "not a blank image"
    assert [p.name for p in tmp_path.iterdir()] == ["c.png"]


@pytest.mark.parametrize("n, values, rotated", [(4, 16, False), (15, 225, True), (16, 0, True)])
def test_confusion_values_up_to_15_classes_and_labels_rotated_when_many(n, values, rotated):
    fig = confusion_figure(_confusion(n), [f"c{i}" for i in range(n)])
    ax = fig.axes[0]
    assert len(ax.texts) == values
    if values:
        assert ax.texts[0].get_text() == f"{_confusion(n)[0, 0]:.2f}"
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"c{i}" for i in range(n)]
    assert (ax.get_xticklabels()[0].get_rotation() == 90) == rotated


def test_confusion_with_many_classes_drops_the_tick_labels():
    ax = confusion_figure(_confusion(41), [str(i) for i in range(41)]).axes[0]
    assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0 and not ax.texts


def test_comparison_png(tmp_path):
    rows = [{"label": "logreg", "top1": 0.91, "seconds": 2.0}, {"label": "knn", "top1": 0.5, "seconds": 0.01}]
    im = _png(plot_comparison(rows, tmp_path / "comparison.png", title="x"))
    assert im.size == pytest.approx((11 * 110, (1.2 + 0.38 * 2) * 110), abs=2)
    labels = [t.get_text() for t in comparison_figure(rows).axes[0].get_yticklabels()]
    assert labels == ["logreg", "knn"]


def test_history_png(tmp_path):
    im = _png(plot_history(HISTORY, tmp_path / "run.curves.png", title="ft", best_epoch=2))
    assert im.size == pytest.approx((1300, 380), abs=2)
    loss, top1, lr = history_figure(HISTORY, best_epoch=2).axes
    assert list(loss.lines[0].get_ydata()) == [h["train_loss"] for h in HISTORY]
    assert list(lr.lines[0].get_ydata()) == [h["lr"] for h in HISTORY]
    assert "best (epoch 2)" in [t.get_text() for t in top1.get_legend().get_texts()]
