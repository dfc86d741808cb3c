"""Unfinished extractions: a split cut into fixed-size chunks of source positions, one file per
finished chunk, in a folder beside the cache file (`<split>.h5.partial/`).

    manifest.json        what the chunks are of: identity, split, images, taps, chunk size, base
    chunk-000042.h5      rows of positions [42 * R, 43 * R) that were computed, and the skipped ones

A chunk file appears whole or not at all (written to a temporary name and renamed), so the set
of chunk files is the durable progress: after Ctrl-C, `kill -9`, a full disk or a dead rank, a
rerun computes only the chunks that are missing. Chunks are independent, so any process may
write any of them in any order (torchrun ranks, Ray actors' results); `extract.store.assemble` joins
them in position order into the cache file. HDF5 has no concurrent writers without MPI, hence
files per chunk rather than one shared file.
"""

from __future__ import annotations

import errno
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from extract.core.atomic import atomic_path, write_text_atomic
from extract.core.errors import UserError

PARTIAL = ".partial"


def partial_path(path) -> Path:
    """The folder holding the finished chunks of the cache file `path` until it is complete."""
    return Path(str(path) + PARTIAL)


def as_text(value) -> str:
    """An HDF5 string (bytes or str) as str; bytes that are not UTF-8 (a file name stored by `stored_text`)
    come back as the str os functions gave for them."""
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else value


def stored_text(text: str) -> str | bytes:
    """`text` for an HDF5 UTF-8 string column: a file name that is not valid UTF-8 keeps its bytes."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def text_column(values) -> np.ndarray:
    """Strings as an object array an HDF5 UTF-8 string dataset takes (see `stored_text`)."""
    return np.asarray([stored_text(v) for v in values] if len(values) else [], dtype=object)


MANIFEST = "manifest.json"
DEFAULT_CHUNK_ROWS = 1024
_STR = h5py.string_dtype("utf-8")
_SPACE_MARGIN = 64 * 1024


def chunk_range(k: int, chunk_rows: int, n: int) -> range:
    """Source positions of chunk `k`."""
    return range(k * chunk_rows, min((k + 1) * chunk_rows, n))


def n_chunks(n: int, chunk_rows: int) -> int:
    return -(-n // chunk_rows)


@dataclass
class Rows:
    """Computed rows of one chunk (source order) and the images of it that could not be read."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    index: np.ndarray
    paths: list[str] | None = None
    stamps: np.ndarray | None = None                      # (n, 2) file size, mtime_ns
    skipped: list[tuple] = field(default_factory=list)    # (index, label, path, reason, size, mtime_ns)

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def empty(dims: dict[str, int], with_paths: bool) -> "Rows":
        return Rows({k: np.zeros((0, d), np.float32) for k, d in dims.items()}, np.zeros(0, np.int64),
                    np.zeros(0, np.int64), [] if with_paths else None,
                    np.zeros((0, 2), np.int64) if with_paths else None)

    @staticmethod
    def join(parts: list["Rows"], dims: dict[str, int], with_paths: bool) -> "Rows":
        """One Rows of several, rows sorted by source position."""
        parts = [p for p in parts if len(p) or p.skipped]
        if not parts:
            return Rows.empty(dims, with_paths)
        index = np.concatenate([p.index for p in parts])
        order = np.argsort(index, kind="stable")
        def cat(arrays):
            return np.concatenate(arrays)[order]

        paths = None
        if with_paths:
            every = [x for p in parts for x in p.paths]
            paths = [every[i] for i in order]
        return Rows({k: cat([p.features[k] for p in parts]) for k in dims}, cat([p.labels for p in parts]),
                    index[order], paths, cat([p.stamps for p in parts]) if with_paths else None,
                    sorted(s for p in parts for s in p.skipped))


class ChunkStore:
    """The `.partial` folder of one cache file: its manifest and finished chunk files."""

    def __init__(self, path, manifest: dict):
        self.path = Path(path)
        self.dir = partial_path(path)
        self.manifest = manifest
        self.chunk_rows = int(manifest["chunk_rows"])
        self.n = int(manifest["n_images"])

    @classmethod
    def open(cls, path, manifest: dict, notify=None) -> "ChunkStore":
        """The store for `manifest`; chunks left by a run of another manifest (other identity,
        images, taps, chunk size or base cache) are discarded, saying so through `notify`."""
        store = cls(path, manifest)
        old = store.read_manifest()
        if old == json.loads(json.dumps(manifest)):
            store.discard_unreadable(notify)
            return store
        if store.dir.exists():
            if old is not None and store.done() and notify:
                notify(f"discarding {len(store.done())} finished chunk(s) of an earlier run with other inputs "
                       f"in {store.dir}")
            shutil.rmtree(store.dir) if store.dir.is_dir() else store.dir.unlink()
        try:
            store.dir.mkdir(parents=True)
            write_text_atomic(store.dir / MANIFEST, json.dumps(manifest, sort_keys=True))
        except OSError as e:
            raise UserError(f"could not create {store.dir}: {e.strerror or e}; free space and rerun the same "
                            "command") from None
        return store

    @classmethod
    def existing(cls, path) -> "ChunkStore | None":
        """The store an unfinished run left for `path`, if any."""
        store = cls(path, {"chunk_rows": 1, "n_images": 0})
        manifest = store.read_manifest()
        return cls(path, manifest) if manifest else None

    def read_manifest(self) -> dict | None:
        try:
            return json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def chunk_path(self, k: int) -> Path:
        return self.dir / f"chunk-{k:06d}.h5"

    def done(self) -> set[int]:
        """Ids of the finished chunks."""
        if not self.dir.is_dir():
            return set()
        return {int(p.name[6:12]) for p in self.dir.glob("chunk-??????.h5")}

    @property
    def total(self) -> int:
        return n_chunks(self.n, self.chunk_rows)

    def write(self, k: int, rows: Rows) -> None:
        """Save chunk `k` whole, or leave no trace of it (OSError on a full disk)."""
        target = self.chunk_path(k)
        need = _SPACE_MARGIN + sum(v.nbytes for v in rows.features.values()) + 300 * (len(rows) + len(rows.skipped))
        free = shutil.disk_usage(self.dir).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device ({free // 1024} KiB free)")
        with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
            for name, values in rows.features.items():
                f.create_dataset(f"features/{name}", data=values)
            f.create_dataset("labels", data=np.asarray(rows.labels, np.int64))
            f.create_dataset("index", data=np.asarray(rows.index, np.int64))
            if rows.paths is not None:
                f.create_dataset("paths", data=text_column(rows.paths), dtype=_STR)
                f.create_dataset("stamps", data=np.asarray(rows.stamps, np.int64).reshape(-1, 2))
            skipped = list(zip(*rows.skipped)) or [()] * 6
            for name, column, dt in zip(("index", "label", "path", "reason", "size", "mtime"), skipped,
                                        (np.int64, np.int64, _STR, _STR, np.int64, np.int64)):
                f.create_dataset(f"skipped/{name}", data=text_column(column) if dt is _STR else
                                 np.asarray(column, dtype=dt), dtype=dt)

    def read(self, k: int) -> Rows:
        with h5py.File(self.chunk_path(k), "r") as f:
            paths = [as_text(p) for p in f["paths"][()]] if "paths" in f else None
            s = {name: f[f"skipped/{name}"][()] for name in ("index", "label", "path", "reason", "size", "mtime")}
            skipped = [(int(i), int(lab), as_text(p), as_text(r), int(sz), int(mt)) for i, lab, p, r, sz, mt in
                       zip(s["index"], s["label"], s["path"], s["reason"], s["size"], s["mtime"])]
            return Rows({name: ds[()] for name, ds in f["features"].items()}, f["labels"][()], f["index"][()],
                        paths, f["stamps"][()] if "stamps" in f else None, skipped)

    def discard_unreadable(self, notify=None) -> None:
        """Remove finished chunk files that do not read back whole (truncated, damaged, of other shapes),
        saying so through `notify`: they are computed again."""
        for k in sorted(self.done()):
            problem = self._problem(k)
            if problem:
                self.chunk_path(k).unlink(missing_ok=True)
                if notify:
                    notify(f"discarding {self.chunk_path(k).name} in {self.dir} ({problem}); computing it again")

    def _problem(self, k: int) -> str | None:
        """Why chunk `k`'s file cannot be assembled, or None."""
        positions = chunk_range(k, self.chunk_rows, self.n)
        dims = self.manifest.get("dims") or {}
        try:
            with h5py.File(self.chunk_path(k), "r") as f:
                n = f["labels"].shape[0]
                shapes = {name: ds.shape for name, ds in f["features"].items()}
                if any(ds[0] != n for ds in shapes.values()) or \
                        dims and (set(shapes) != set(dims) or any(shapes[t][1] != dims[t] for t in dims)):
                    return "its features are not of the expected taps and rows"
                index = np.concatenate([f["index"][()], f["skipped/index"][()]])
                if len(f["index"]) != n or len(index) and (index.min() < positions.start or
                                                           index.max() >= positions.stop):
                    return "its rows are not the chunk's"
        except Exception as e:  # noqa: BLE001 - truncated or damaged: h5py raises OSError, RuntimeError...
            text = str(e).strip()
            return text.splitlines()[0] if text else type(e).__name__
        return None

    def rows_done(self) -> int:
        """Rows saved in finished chunks (for messages)."""
        total = 0
        for k in self.done():
            try:
                with h5py.File(self.chunk_path(k), "r") as f:
                    total += len(f["labels"])
            except OSError:
                pass
        return total

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
