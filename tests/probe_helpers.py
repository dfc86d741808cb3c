"""Tiny synthetic caches for the probe tests, written through extract's public cache writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from extract.store.cache import write_features
from extract.store.identity import DataRef, FeatureIdentity
from extract.store.preprocess import Preprocess


def blobs(n_per_class=40, n_classes=3, dim=16, sep=6.0, seed=0):
    """Well separated Gaussian blobs: (X float32, y int64)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * sep
    y = np.repeat(np.arange(n_classes), n_per_class)
    X = centres[y] + rng.normal(size=(len(y), dim))
    perm = rng.permutation(len(y))
    return X[perm].astype(np.float32), y[perm]


def toy_identity(dataset="toy", model="tinynet", precision="fp32", precision_requested="auto",
                 dtype="float32", **changes) -> FeatureIdentity:
    """A feature identity for hand-made caches; keyword arguments replace any component."""
    return FeatureIdentity(data=DataRef(dataset), model=model, weights_sha256=None, preprocess=Preprocess(),
                           precision=precision, precision_requested=precision_requested, dtype=dtype, **changes)


def write_split(cache_dir, split, X, y, *, layer="penultimate", classes=None, index=None, identity=None,
                **identity_kw) -> Path:
    classes = classes or [f"c{i}" for i in range(int(np.max(y)) + 1 if len(y) else 2)]
    identity = identity or toy_identity(**identity_kw)
    prov = {"model": identity.model, "dataset": identity.data.name, "split": split, "classes": classes,
            "layers": [layer]}
    return write_features(identity, cache_dir, split, {layer: np.asarray(X, np.float32)}, y, index, prov)


def toy_cache(cache_dir, splits=("train", "test"), seed=0, n_classes=3, dim=16, n_per_class=40, **kw) -> dict:
    """A complete toy extraction with the given splits; returns {split: path}."""
    out = {}
    for i, split in enumerate(splits):
        X, y = blobs(n_per_class if split == "train" else max(10, n_per_class // 2), n_classes, dim, seed=seed)
        rng = np.random.default_rng(seed + 10 + i)
        X = X + rng.normal(scale=0.3, size=X.shape).astype(np.float32)
        out[split] = write_split(cache_dir, split, X, y, **kw)
    return out
