"""Every figure kind, drawn with long names, keeps all its text on the canvas (measured with the
renderer's text extents, and the figure's tight bounding box for tick labels)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.text import Text

from extract.store.identity import DataRef
from finetune.plot import history_figure
from probe.analyses.compare import compare_figure, layer_figure
from probe.analyses.fewshot import fewshot_figure
from probe.analyses.maps import map_figure
from probe.analyses.ranking import Ranking, ranking_figure
from probe.analyses.samples import samples_figure
from probe.analyses.similarity import Side, Similarity, similarity_figure
from probe.output.plots import comparison_figure, confusion_figure
from probe_helpers import toy_identity

LONGER = " · ".join(["a very long title part that goes on"] * 6)
LONG = "hymenoptera_data-6f0e2b · timm/convnext_tiny.fb_in22k_ft_in1k · stages.2 · logreg (bf16, float16)"
CLASSES2 = ["formicidae_worker_ants_from_the_garden", "apis_mellifera_honey_bees_on_flowers"]
CLASSES12 = [f"a rather long class name number {i}" for i in range(12)]
MODELS = ["timm/convnext_tiny.fb_in22k_ft_in1k", "timm/vit_small_patch14_dinov2.lvd142m", "efficientnet_lite0"]
TAPS = ["stages.0", "stages.1", "blocks.11:cls", "penultimate"]


def _compare_rows(taps=("penultimate",), models=MODELS, heads=("logreg", "knn", "svm")):
    rng = np.random.default_rng(0)
    return [{"label": m, "tap": t, "head": h, "val_top1": float(rng.uniform(0.6, 1)),
             "test_top1": float(rng.uniform(0.6, 1))} for m in models for t in taps for h in heads]


def _ranking():
    rows = [{"label": m, "tap": t, "logme": 0.1 * i, "hscore": 1234.5 + i, "test_top1": 0.9 - 0.01 * i, "n": 10,
             "dims": 768} for i, (m, t) in enumerate((m, t) for m in MODELS for t in TAPS)]
    corr = {"logme": {"tau": 0.5, "p": 0.01, "n": 12}, "hscore": {"tau": -0.2, "p": 0.4, "n": 12}}
    return Ranking(rows, DataRef("hymenoptera_data_with_a_long_name"), "logreg", corr)


def _similarity():
    a = Side(toy_identity(model=MODELS[0]), "a.h5", TAPS)
    b = Side(toy_identity(model=MODELS[1]), "b.h5", TAPS[:3])
    m = np.random.default_rng(0).uniform(0, 1, (4, 3))
    return Similarity(a, b, "test", 153, m, m, "debiased")


def _fewshot():
    points = [{"k": k, "mean": 0.5 + 0.04 * i, "ci95": [0.45 + 0.04 * i, 0.55 + 0.04 * i]}
              for i, k in enumerate((1, 2, 5, 10, 20))] + [{"k": None, "mean": 0.95, "ci95": None}]
    return [{"label": f"{m} · logreg", "points": points} for m in MODELS]


HISTORY = [{"epoch": e, "train_loss": 850.0 / e, "val_loss": 900.0 / e, "train_top1": 0.5 + e / 10,
            "val_top1": 0.4 + e / 10, "lr": 0.1 / e} for e in (1, 2, 3)]

FIGURES = {
    "confusion-2": lambda: confusion_figure([[0.9, 0.1], [0.2, 0.8]], CLASSES2, title=LONG),
    "confusion-12": lambda: confusion_figure(np.eye(12), CLASSES12, title=LONG),
    "comparison": lambda: comparison_figure([{"label": f"{m}/penultimate · svm-rbf", "top1": 0.9, "seconds": s}
                                             for m, s in zip(MODELS, (850.0, 0.004, 12345.6))], title=LONG),
    "compare": lambda: compare_figure(_compare_rows(), _compare_rows()[0], title=LONG),
    "layers": lambda: compare_figure(_compare_rows(TAPS), _compare_rows(TAPS)[4], title=LONG),
    "layers-one-head": lambda: compare_figure(_compare_rows(["stage1", "stage2"], ["efficientnet_lite0"], ["logreg"]),
                                              title="digits · 2 runs"),
    "compare-one": lambda: compare_figure(_compare_rows(models=["a"], heads=["knn"]), title=LONG),
    "layers-curve": lambda: layer_figure(_compare_rows(TAPS), title=LONG),
    "fewshot": lambda: fewshot_figure(_fewshot(), title=LONG),
    "map": lambda: map_figure(np.random.default_rng(0).normal(size=(40, 2)), np.arange(40) % 2, CLASSES2,
                              wrong=np.arange(40) % 7 == 0, title=LONG + "\n" + LONG),
    "samples-1": lambda: samples_figure([np.zeros((32, 32, 3), np.uint8)], CLASSES2[:1], CLASSES2[1:], title=LONG),
    "samples-6": lambda: samples_figure([np.zeros((32, 32, 3), np.uint8)] * 6, CLASSES2 * 3, CLASSES2[::-1] * 3,
                                        title=LONG + "\n" + LONG),
    "rank": lambda: ranking_figure(_ranking()),
    "similarity": lambda: similarity_figure(_similarity()),
    "history": lambda: history_figure(HISTORY, title=LONGER, best_epoch=2),
    "fewshot-longer": lambda: fewshot_figure(_fewshot(), title=LONGER),
    "layers-curve-longer": lambda: layer_figure(_compare_rows(TAPS, MODELS[:1]), title=LONGER),
}


def texts_outside(fig) -> list[str]:
    """Text that does not lie within the canvas: each Text artist's window extent, then the tight
    bounding box of everything drawn (tick labels included)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    width, height = fig.bbox.width, fig.bbox.height
    out = []
    ticks = {id(t) for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()}
    for text in fig.findobj(Text):
        if id(text) in ticks or not text.get_visible() or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1:
            out.append(f"{text.get_text()!r} at {box.bounds} on a {width:.0f}x{height:.0f} canvas")
    tight = fig.get_tightbbox(renderer).transformed(fig.dpi_scale_trans)
    if tight.x0 < -1 or tight.y0 < -1 or tight.x1 > width + 1 or tight.y1 > height + 1:
        out.append(f"drawn content {tight.bounds} leaves the {width:.0f}x{height:.0f} canvas")
    return out


@pytest.mark.parametrize("kind", sorted(FIGURES))
def test_no_text_leaves_the_canvas(kind):
    fig = FIGURES[kind]()
    assert texts_outside(fig) == []


def test_the_check_sees_clipped_text():
    from probe.output.plots import new_figure

    fig = new_figure(figsize=(2, 2))
    fig.add_subplot().set_title(LONG)
    assert texts_outside(fig)


def test_numbers_are_written_plainly():
    shown = [t.get_text() for t in FIGURES["comparison"]().findobj(Text)]
    assert " 850" in shown and " 12346" in shown and " 0.004" in shown and not any("e+" in s for s in shown)
    shown = [t.get_text() for t in FIGURES["rank"]().findobj(Text)]
    assert "1234" in shown and "0.30" in shown and not any("e+" in s for s in shown)
