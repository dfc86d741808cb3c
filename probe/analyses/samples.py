"""A grid of test images with "true / predicted" under each, mistakes in red: what a saved head
gets right and wrong (the PyTorch transfer-learning tutorial's `visualize_model`, without a network:
the head predicts from the cached test features).

Images come from the cache's `paths` column for file datasets, and for in-memory datasets from the
dataset itself, rebuilt from the features' identity and checked against the cache's fingerprint.

    grid = sample_grid("cache/digits/resnet50/test.h5", "results/.../logreg.skops", n=16)
    plot_samples(grid.images, grid.true_labels, grid.pred_labels, "samples.png")
    write_samples(head_file="results/.../logreg.skops")   # samples-logreg.png beside the head
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from extract.core.errors import UserError
from extract.store.identity import FeatureIdentity

from probe.analyses.maps import (class_names, head_name, head_predict, head_test_features, load_head_logged,
                                 open_features, split_label)
from probe.output.plots import fit_label, new_figure, save_png, wrap

log = logging.getLogger(__name__)

THUMB = 160              # longest side of an image as shown (file images are downscaled to it)
MISTAKE = "#d62728"      # red
_MAX_COLS = 8


@dataclass
class SampleGrid:
    """The images chosen for a grid and what the head says about them (one entry per image)."""

    images: list[np.ndarray]     # HxWx3 uint8
    rows: np.ndarray             # positions in the test cache
    index: np.ndarray            # positions in the source split
    true: np.ndarray             # class ids (the cache's labels)
    pred: np.ndarray             # the head's class ids
    classes: list[str]
    identity: FeatureIdentity
    layer: str
    split: str
    head: str
    split_wrong: int = 0         # mistakes among all rows of the split
    split_rows: int = 0

    @property
    def wrong(self) -> np.ndarray:
        return self.pred != self.true

    @property
    def true_labels(self) -> list[str]:
        return [self.classes[c] for c in self.true]

    @property
    def pred_labels(self) -> list[str]:
        return [self.classes[c] if 0 <= c < len(self.classes) else str(c) for c in self.pred]


# --- which rows -------------------------------------------------------------------------------

def choose_rows(wrong, n: int, seed: int = 0, only_mistakes: bool = False) -> np.ndarray:
    """Sorted positions of min(n, available) rows, seeded: half mistakes when there are that many
    (else all of them), the rest right; with only_mistakes, mistakes only."""
    wrong = np.asarray(wrong, bool)
    if n < 1:
        raise UserError("the sample grid needs n >= 1 images")
    rng = np.random.default_rng(seed)
    bad, good = rng.permutation(np.flatnonzero(wrong)), rng.permutation(np.flatnonzero(~wrong))
    if only_mistakes:
        if not len(bad):
            raise UserError("the head gets every test image right: there are no mistakes to show")
        return np.sort(bad[:n])
    n = min(n, len(wrong))
    k_bad = min(len(bad), max(n // 2, 1 if len(bad) else 0))
    k_good = min(len(good), n - k_bad)
    k_bad = n - k_good            # too few right ones: fill with mistakes
    return np.sort(np.concatenate([bad[:k_bad], good[:k_good]]))


# --- the images -------------------------------------------------------------------------------

def thumbnail(image, size: int = THUMB) -> np.ndarray:
    """An RGB PIL image or array, downscaled (never enlarged) so its longest side is at most size."""
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8), "RGB")
    if max(im.size) > size:
        im = im.copy()
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def _placeholder(size: int = 32) -> np.ndarray:
    return np.full((size, size, 3), 200, np.uint8)


def file_images(paths: list[str], size: int = THUMB) -> list[np.ndarray]:
    """Decoded, downscaled files; an unreadable one (moved, deleted) is a grey tile and a warning."""
    from extract.registry.images import ImageError, open_rgb

    out = []
    for p in paths:
        try:
            out.append(thumbnail(open_rgb(p), size))
        except ImageError as e:
            log.warning(f"warning: cannot show {p}: {e.reason}")
            out.append(_placeholder())
    return out


def dataset_source(meta: dict, root=None):
    """The split's in-memory ImageSource, rebuilt from the identity's DataRef; refused if its images
    differ from the ones the cache was extracted from."""
    from extract.registry.datasets import load_dataset

    ref = meta["identity"].data
    root = root or ref.root or (meta.get("provenance", {}).get("dataset_identity") or {}).get("root")
    dataset = load_dataset(ref.name, root=root, **dict(ref.options))
    split = meta.get("split")
    if split not in dataset.splits:
        raise UserError(f"dataset {ref.describe()} has no split {split!r}; it has {', '.join(dataset.splits)}")
    source = dataset.splits[split]
    if meta.get("fingerprint") and source.fingerprint() != meta["fingerprint"]:
        raise UserError(f"the {split} images of {ref.describe()} changed since {meta.get('path')} was extracted; "
                        "re-extract to see the images the features belong to")
    return source


def array_images(source, index, size: int = THUMB) -> list[np.ndarray]:
    """The source's images at these source positions, downscaled when large."""
    if source.arrays is None:
        return file_images([source.paths[i] for i in index], size)
    return [thumbnail(source.arrays[i], size) for i in index]


def images_for(meta: dict, rows, root=None, size: int = THUMB) -> list[np.ndarray]:
    """The images of cache rows: from the `paths` column, else from the rebuilt in-memory dataset."""
    if meta.get("paths") is not None:
        return file_images([meta["paths"][r] for r in rows], size)
    return array_images(dataset_source(meta, root), np.asarray(meta["index"])[rows], size)


# --- grid data, figure, file ------------------------------------------------------------------

def sample_grid(test_features=None, head_file=None, *, n: int = 16, seed: int = 0, only_mistakes: bool = False,
                layer: str | None = None, root=None) -> SampleGrid:
    """n test images (seeded: a mix of right and wrong when there are mistakes) with the saved head's
    predictions on their cached features. Without test_features, the head's result JSON names them;
    `root` finds a torchvision dataset moved since extraction."""
    if head_file is None:
        raise UserError("the sample grid needs a saved head (--head NAME)")
    pipeline, sidecar = load_head_logged(head_file)
    if test_features is None:
        test_features = head_test_features(head_file)
    feats = open_features(test_features, layer or sidecar.get("layer"))
    pred = head_predict(pipeline, sidecar, feats, head_file)
    rows = choose_rows(pred != feats.y, n, seed, only_mistakes)
    meta = feats.meta
    return SampleGrid(images=images_for(meta, rows, root), rows=rows, index=np.asarray(meta["index"])[rows],
                      true=feats.y[rows], pred=pred[rows], classes=class_names(meta, sidecar, feats.y),
                      identity=meta["identity"], layer=meta["layer"], split=split_label(meta),
                      head=head_name(head_file, sidecar), split_wrong=int((pred != feats.y).sum()),
                      split_rows=len(feats.y))


def samples_figure(images, true_labels, pred_labels, title: str = "") -> Figure:
    """Images in a grid, "true / predicted" under each; mistakes get a red caption and border."""
    n = len(images)
    if n != len(true_labels) or n != len(pred_labels):
        raise ValueError(f"{n} images for {len(true_labels)} true and {len(pred_labels)} predicted labels")
    cols = max(1, min(_MAX_COLS, math.ceil(math.sqrt(n))))
    rows = max(1, math.ceil(n / cols))
    fig = new_figure(figsize=(1.9 * cols + 0.4, 2.15 * rows + 0.5), layout="constrained")
    for i, (img, t, p) in enumerate(zip(images, true_labels, pred_labels)):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(np.asarray(img), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        bad = str(t) != str(p)
        for spine in ax.spines.values():
            spine.set_visible(bad)
            spine.set_color(MISTAKE)
            spine.set_linewidth(3)
        ax.set_xlabel(fit_label(f"{t} / {p}", 26, 3), fontsize=8, color=MISTAKE if bad else "black",
                      fontweight="bold" if bad else "normal")
    fig.suptitle(wrap(title or "true / predicted", 1.9 * cols + 0.2, 9), fontsize=9)
    return fig


def plot_samples(images, true_labels, pred_labels, path, title: str = "") -> Path:
    """Write samples_figure as a PNG; returns path."""
    return save_png(samples_figure(images, true_labels, pred_labels, title), path)


def samples_title(grid: SampleGrid) -> str:
    head = (f"{grid.head} on {grid.split or 'test'} images · {grid.identity.data.label} · {grid.identity.model} · "
            f"{grid.layer}")
    return (f"{head}\ntrue / predicted; {int(grid.wrong.sum())} of {len(grid.rows)} shown are wrong "
            f"({grid.split_wrong} of {grid.split_rows} in the split)")


def write_samples(test_features=None, head_file=None, *, results_root="results", n: int = 16, seed: int = 0,
                  only_mistakes: bool = False, layer: str | None = None, root=None) -> Path:
    """sample_grid drawn to <results>/<identity>/<layer>/samples-<head>.png; returns the path."""
    grid = sample_grid(test_features, head_file, n=n, seed=seed, only_mistakes=only_mistakes, layer=layer,
                       root=root)
    path = grid.identity.results_dir(results_root, grid.layer) / f"samples-{grid.head}.png".replace("/", "_")
    plot_samples(grid.images, grid.true_labels, grid.pred_labels, path, title=samples_title(grid))
    log.info(f"wrote {path}")
    return path
