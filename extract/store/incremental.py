"""Incremental extraction: which rows of an earlier cache of the same identity the current images reuse.

An image file is unchanged when its path, size and modification time (nanoseconds) are those
recorded in the cache; its features are then copied, never recomputed, and its label is taken
from the current folder (so a new class folder only relabels). Files that are new or changed
are computed, files that are gone are dropped. Images that could not be read are remembered the
same way and not retried while unchanged. Contents are not hashed: a rewrite that keeps size
and mtime is not seen (as with make or rsync's default check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from extract.store.chunks import as_text


@dataclass
class Reuse:
    """Per source position: the base cache's feature row (`row`) or skip record (`skip`) to copy, or -1."""

    base: Path | None
    row: np.ndarray
    skip: np.ndarray
    new: int = 0
    changed: int = 0
    removed: int = 0
    base_fingerprint: str | None = None   # the base cache's, so a resume knows it is the same base

    @staticmethod
    def none(n: int) -> "Reuse":
        return Reuse(None, np.full(n, -1, np.int64), np.full(n, -1, np.int64))

    @property
    def reused(self) -> int:
        return int((self.row >= 0).sum() + (self.skip >= 0).sum())

    def describe(self) -> str:
        return (f"{self.reused:,} reused, {self.new:,} new, {self.removed:,} removed, "
                f"{self.changed:,} changed")


def stamps_of(paths: list[str]) -> np.ndarray:
    """(N, 2) int64 (size, mtime_ns) of each file; (-1, -1) for one that cannot be stat'ed."""
    import os

    out = np.full((len(paths), 2), -1, np.int64)
    for i, p in enumerate(paths):
        try:
            st = os.stat(p)
            out[i] = st.st_size, st.st_mtime_ns
        except OSError:
            pass
    return out


def can_reuse(base: Path) -> bool:
    """True when the complete cache `base` records per-file stamps (files written before them do not)."""
    try:
        with h5py.File(base, "r", locking=False) as f:
            return "stamps" in f and "skipped/size" in f
    except OSError:
        return False


def plan(base: Path, paths: list[str], stamps: np.ndarray) -> Reuse:
    """Match the current files (`paths`, `stamps`) against the rows and skip records of `base`."""
    with h5py.File(base, "r", locking=False) as f:
        old_paths = [as_text(p) for p in f["paths"][()]]
        old_stamps = f["stamps"][()]
        skip_paths = [as_text(p) for p in f["skipped/path"][()]]
        skip_stamps = np.stack([f["skipped/size"][()], f["skipped/mtime"][()]], axis=1)
        base_fingerprint = str(f.attrs.get("fingerprint", ""))
    rows = {p: (i, tuple(s)) for i, (p, s) in enumerate(zip(old_paths, old_stamps.tolist()))}
    skips = {p: (i, tuple(s)) for i, (p, s) in enumerate(zip(skip_paths, skip_stamps.tolist()))}
    reuse = Reuse(Path(base), np.full(len(paths), -1, np.int64), np.full(len(paths), -1, np.int64),
                  base_fingerprint=base_fingerprint)
    seen = 0
    for pos, (p, s) in enumerate(zip(paths, stamps.tolist())):
        old = rows.get(p) or skips.get(p)
        if old is None:
            reuse.new += 1
            continue
        seen += 1
        if old[1] != tuple(s) or s[0] < 0:
            reuse.changed += 1
        elif p in rows:
            reuse.row[pos] = old[0]
        else:
            reuse.skip[pos] = old[0]
    reuse.removed = len(rows) + len(skips) - seen
    return reuse
