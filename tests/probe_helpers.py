"""Tiny synthetic caches for the probe tests, written through extract's public cache writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.cache import cache_path, write_features


def blobs(n_per_class=40, n_classes=3, dim=16, sep=6.0, seed=0):
    """Well separated Gaussian blobs: (X float32, y int64)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * sep
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    return X[perm].astype(np.float32), y[perm]


def write_split(cache_dir, split, X, y, *, dataset="toy", model="tinynet", weights=None, layer="penultimate",
                classes=None, index=None) -> Path:
    classes = classes or [f"c{i}" for i in range(int(np.max(y)) + 1 if len(y) else 2)]
    path = cache_path(cache_dir, dataset, model, weights, split)
    prov = {"model": model, "name": model, "weights": weights or "default", "dataset": dataset, "split": split,
            "classes": classes, "layers": [layer], "dims": {layer: int(X.shape[1])}}
    return write_features(path, {layer: np.asarray(X, np.float32)}, y, index, prov)


def toy_cache(cache_dir, splits=("train", "test"), seed=0, n_classes=3, dim=16, n_per_class=40, **kw) -> dict:
    """A complete toy extraction with the given splits; returns {split: path}."""
    out = {}
    for i, split in enumerate(splits):
        X, y = blobs(n_per_class if split == "train" else max(10, n_per_class // 2), n_classes, dim, seed=seed)
        rng = np.random.default_rng(seed + 10 + i)
        X = X + rng.normal(scale=0.3, size=X.shape).astype(np.float32)
        out[split] = write_split(cache_dir, split, X, y, **kw)
    return out
