"""Seeded, stratified row selection that depends only on each row's source index.

A row's membership is a function of (seed, its source index, the other members of its class), so
it does not change when the cache's row order changes, and finetune carves the same rows.
"""

from __future__ import annotations

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _hash(values: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of (seed, value): a fast, well-mixed, platform-independent hash."""
    with np.errstate(over="ignore"):
        z = values.astype(np.uint64) + np.uint64(seed & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _ranked(index: np.ndarray, seed: int) -> np.ndarray:
    """Positions of `index` sorted by their seeded hash (ties broken by the index itself)."""
    return np.lexsort((index, _hash(index, seed)))


def validation_mask(index, labels, seed: int = 0, fraction: float = 0.2) -> np.ndarray:
    """Boolean mask, True = validation row: round(fraction * n_c) rows of each class c.

    A class with at least two rows keeps at least one row on each side.
    """
    index, labels = np.asarray(index), np.asarray(labels)
    if index.shape != labels.shape:
        raise ValueError("index and labels must have the same length")
    mask = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        n = len(rows)
        take = int(np.floor(fraction * n + 0.5))
        if n >= 2:
            take = min(max(take, 1), n - 1)
        mask[rows[_ranked(index[rows], seed)[:take]]] = True
    return mask


def stratified_subsample(index, labels, n: int, seed: int = 0) -> np.ndarray:
    """Sorted positions of about `n` rows keeping class proportions (every class keeps >= 1 row)."""
    index, labels = np.asarray(index), np.asarray(labels)
    if n >= len(labels):
        return np.arange(len(labels))
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        take = max(1, int(round(n * len(rows) / len(labels))))
        keep.append(rows[_ranked(index[rows], seed + 1)[:take]])
    return np.sort(np.concatenate(keep))


def split_roles(available) -> tuple[str, str | None] | None:
    """(test split, validation split or None) by the shared rule, or None when nothing is held out.

    The dataset's own test split is the test set and its val split the validation set; a dataset
    with only train and val uses val as its test set (validation is then carved from train).
    """
    available = set(available)
    if "test" in available:
        return "test", ("val" if "val" in available else None)
    if "val" in available:
        return "val", None
    return None
