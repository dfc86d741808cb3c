"""Features left in their cache file: a row view over HDF5 datasets, read in float32 blocks.

`Rows.of(path, name)` stands for an (N, D) dataset without reading it; `rows[mask]`, `rows[positions]`
and `concat` give views of views. A view reopens its files on demand, so it pickles (a saved k-NN head
keeps a reference to the cache, not a copy of it). `iter_blocks` reads arrays, h5py datasets and views
alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import numpy as np

from extract.core.errors import UserError


@dataclass(frozen=True)
class _Part:
    path: str
    name: str
    n: int
    index: np.ndarray | None = None   # sorted source rows; None: every row

    def __len__(self) -> int:
        return self.n if self.index is None else len(self.index)


class Rows:
    """An (N, D) float32 view over rows of one or more HDF5 datasets, read block by block."""

    def __init__(self, parts, dim: int):
        self.parts = tuple(p for p in parts if len(p))
        self.dim = int(dim)
        self._files: dict[str, h5py.File] = {}

    @classmethod
    def of(cls, path, name: str) -> "Rows":
        with h5py.File(path, "r") as f:
            n, dim = f[name].shape
        return cls([_Part(str(path), name, int(n))], dim)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self), self.dim)

    ndim = 2
    dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def nbytes(self) -> int:
        return len(self) * self.dim * 4

    def __getitem__(self, key) -> "Rows":
        """Rows at a boolean mask or sorted positions, as a view."""
        key = np.asarray(key)
        positions = np.flatnonzero(key) if key.dtype == bool else key.astype(np.int64)
        if len(positions) > 1 and np.any(np.diff(positions) <= 0):
            raise ValueError("Rows views take sorted, distinct positions")
        parts, start = [], 0
        for p in self.parts:
            lo, hi = np.searchsorted(positions, [start, start + len(p)])
            local = positions[lo:hi] - start
            parts.append(_Part(p.path, p.name, p.n, local if p.index is None else p.index[local]))
            start += len(p)
        return Rows(parts, self.dim)

    def _dataset(self, part: _Part):
        if part.path not in self._files:
            self._files[part.path] = h5py.File(part.path, "r")
        return self._files[part.path][part.name]

    def blocks(self, rows: int):
        """float32 blocks of at most `rows` rows, in order; a NaN or inf value is a UserError."""
        for part in self.parts:
            ds = self._dataset(part)
            if part.index is None:
                spans = ((s, min(s + rows, part.n), None) for s in range(0, part.n, rows))
            else:
                spans = _spans(part.index, rows)
            for lo, hi, pick in spans:
                block = np.asarray(ds[lo:hi], dtype=np.float32)
                block = block if pick is None else block[pick - lo]
                if not np.isfinite(block).all():
                    raise UserError(f"features in {part.path} contain NaN or inf values")
                yield block

    def __array__(self, dtype=None, copy=None):
        out = np.concatenate(list(self.blocks(1 << 16))) if len(self) else np.empty((0, self.dim), np.float32)
        return out if dtype is None else out.astype(dtype, copy=False)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def __getstate__(self):
        return {"parts": self.parts, "dim": self.dim}

    def __setstate__(self, state):
        self.parts, self.dim, self._files = state["parts"], state["dim"], {}


def _spans(index: np.ndarray, rows: int):
    """(lo, hi, picked source rows) per run of at most `rows` source rows holding selected ones."""
    i = 0
    while i < len(index):
        lo = int(index[i])
        j = int(np.searchsorted(index, lo + rows))
        yield lo, int(index[j - 1]) + 1, index[i:j]
        i = j


def concat(a, b):
    """a then b: np.concatenate for arrays, a view for Rows."""
    if isinstance(a, Rows) and isinstance(b, Rows):
        if a.dim != b.dim:
            raise ValueError(f"cannot join views of {a.dim} and {b.dim} columns")
        return Rows(a.parts + b.parts, a.dim)
    return np.concatenate([np.asarray(a), np.asarray(b)])


def is_streamed(X) -> bool:
    """True for features read from disk on demand (h5py datasets and Rows views)."""
    return isinstance(X, (Rows, h5py.Dataset))


def iter_blocks(X, rows: int):
    """float32 blocks of at most `rows` rows of an array, an h5py dataset or a Rows view."""
    if isinstance(X, Rows):
        yield from X.blocks(rows)
        return
    streamed = isinstance(X, h5py.Dataset)
    for start in range(0, len(X), rows):
        block = np.asarray(X[start:start + rows], dtype=np.float32)
        if streamed and not np.isfinite(block).all():
            raise UserError(f"features in {X.file.filename} contain NaN or inf values")
        yield block
