"""Seeded, stratified row selection that depends only on each row's source index.

A row's membership is a function of (seed, its source index, the other members of its class), so
it does not change when the cache's row order changes, and finetune carves the same rows.

A dataset with only a train split (a folder of class folders) gets its test rows the same way
(`carve`): a seeded stratified fraction of train on its own hash stream (`split_seed`), so the
validation seed never moves the test set; validation is then carved from the rest.
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


TEST_STREAM = 0x7E57C0DE   # the test carve's hash stream, apart from validation's at any seed


def _ranked(index: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
    """Positions of `index` sorted by their seeded hash (ties broken by the index itself)."""
    key = _hash(index, seed)
    if stream:
        key = _hash(key ^ np.uint64(stream), 0)
    return np.lexsort((index, key))


def validation_mask(index, labels, seed: int = 0, fraction: float = 0.2) -> np.ndarray:
    """Boolean mask, True = validation row: round(fraction * n_c) rows of each class c.

    A class with at least two rows keeps at least one row on each side.
    """
    return _per_class(index, labels, seed, fraction, 0)


def holdout_mask(index, labels, seed: int = 0, fraction: float = 0.2) -> np.ndarray:
    """Boolean mask, True = test row carved from train: validation_mask's rule on the test stream."""
    return _per_class(index, labels, seed, fraction, TEST_STREAM)


def _per_class(index, labels, seed: int, fraction: float, stream: int) -> np.ndarray:
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
        mask[rows[_ranked(index[rows], seed, stream)[:take]]] = True
    return mask


def carve(index, labels, *, seed: int = 0, val_fraction: float = 0.2, test_fraction: float | None = None,
          split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(test, validation) masks over every train row: with test_fraction, holdout_mask(split_seed) first
    (else no test rows), then validation_mask(seed) of the rows left."""
    index, labels = np.asarray(index), np.asarray(labels)
    test = holdout_mask(index, labels, split_seed, test_fraction) if test_fraction else np.zeros(len(index), bool)
    val = np.zeros(len(index), bool)
    rest = np.flatnonzero(~test)
    val[rest] = validation_mask(index[rest], labels[rest], seed, val_fraction)
    return test, val


def describe_carve(fraction: float, split_seed: int, n: int | None = None) -> str:
    """'20% of train carved by split seed 0[, 49 rows]': how carved test rows were chosen."""
    return f"{fraction:.0%} of train carved by split seed {split_seed}" + ("" if n is None else f", {n} rows")


def check_fraction(value, flag: str) -> float:
    """A fraction strictly between 0 and 1 (UserError naming the flag otherwise)."""
    from extract.core.errors import UserError

    if value is None or not 0 < float(value) < 1:
        raise UserError(f"{flag} takes a fraction between 0 and 1, not {value!r}")
    return float(value)


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
    """(test split, validation split or None) by the shared rule, or None when nothing is held out
    (only train: its test rows are carved, see `carve`).

    The dataset's own test split is the test set and its val split the validation set; a dataset
    with only train and val uses val as its test set (validation is then carved from train).
    """
    available = set(available)
    if "test" in available:
        return "test", ("val" if "val" in available else None)
    if "val" in available:
        return "val", None
    return None
