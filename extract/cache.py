"""The HDF5 feature cache: a resumable writer, a reader that trusts only complete files, a lock.

One file per feature identity and split (`FeatureIdentity.cache_path`); it may hold several taps.

    features/<tap>    (N, D)  float32 or float16, chunked, resizable
    labels            (N,)    int64
    index             (N,)    int64   row -> position in the source split
    paths             (N,)    utf-8   only where the images are files
    skipped/index, skipped/label, skipped/path, skipped/reason   unreadable images

Attributes: `identity` (JSON, see extract.identity) with flat copies (model, dataset, precision,
dtype, format), `split`, `fingerprint` (of the split's images), `complete`, `provenance` (JSON),
`versions` (JSON), `created`, `next_index` (source position to resume from), `n_rows`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

import h5py
import numpy as np
from filelock import FileLock, Timeout

from .errors import UserError
from .identity import FeatureIdentity

PARTIAL = ".partial"
_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 256 * 1024
_SPACE_MARGIN = 256 * 1024
_SKIP_COLUMNS = (("index", np.int64), ("label", np.int64), ("path", _STR), ("reason", _STR))


class Features(NamedTuple):
    """What a cache file holds for one tap: X (N, D), y (N,), and everything else in meta."""

    X: np.ndarray
    y: np.ndarray
    meta: dict


def partial_path(path) -> Path:
    return Path(str(path) + PARTIAL)


def lock_for(path, timeout: float = -1) -> FileLock:
    """An inter-process lock guarding one cache file (final and partial alike)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock", timeout=timeout)


def acquire(lock: FileLock, path, notify) -> None:
    """Take the file's lock, saying so if another process holds it and we have to wait."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        notify(f"waiting for another process writing {path}")
        lock.acquire()


def versions() -> dict:
    """Installed versions of what shapes the features (read from metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name, dist in (("featprobe", "featprobe"), ("torch", "torch"), ("torchvision", "torchvision"),
                       ("h5py", "h5py"), ("numpy", "numpy"), ("sklearn", "scikit-learn")):
        try:
            out[name] = version(dist)
        except PackageNotFoundError:
            out[name] = None
    if out["featprobe"] is None:  # running from a source checkout
        from . import __version__
        out["featprobe"] = __version__
    return out


def _attr_json(f: h5py.File, name: str) -> dict:
    raw = f.attrs.get(name)
    return json.loads(raw) if raw is not None else {}


def read_header(path) -> dict | None:
    """Identity, provenance, taps and completeness of a cache file; None if absent.

    A file that exists but cannot be read has `damaged` set to the reason.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        # Unlocked read: a writer may hold the file open; writers are serialised by lock_for().
        with h5py.File(path, "r", locking=False) as f:
            return {"identity": FeatureIdentity.from_attrs(f.attrs), "split": str(f.attrs.get("split", "")),
                    "fingerprint": str(f.attrs.get("fingerprint", "")), "provenance": _attr_json(f, "provenance"),
                    "complete": bool(f.attrs.get("complete", False)),
                    "layers": sorted(f["features"].keys()) if "features" in f else [],
                    "n_rows": int(f.attrs.get("n_rows", 0)), "next_index": int(f.attrs.get("next_index", 0)),
                    "created": str(f.attrs.get("created", "")), "damaged": None}
    except (OSError, KeyError, ValueError) as e:
        return {"identity": None, "complete": False, "layers": [], "n_rows": 0, "damaged": _first_line(e)}


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def damaged_message(path, reason: str) -> str:
    return (f"cache {path} is damaged ({reason}): delete it and rerun the same `python -m extract` command "
            "to rebuild it")


class CacheWriter:
    """Append extracted rows to `<path>.partial`; durable progress after each flush; rename when done.

    A partial file of the same identity, split, images and taps is resumed from its `next_index`.
    Use under `lock_for(path)` so two processes never write one file. `has_paths` is False for
    in-memory sources, which then get no `paths` column.
    """

    def __init__(self, path, identity: FeatureIdentity, split: str, fingerprint: str, provenance: dict,
                 dims: dict[str, int], *, has_paths: bool = True, flush_rows: int = 1024,
                 flush_seconds: float = 2.0):
        self.path = Path(path)
        self.partial = partial_path(path)
        self.dtype = np.dtype(identity.dtype)
        self.has_paths = has_paths
        self.flush_rows, self.flush_seconds = flush_rows, flush_seconds
        self._last_flush = time.monotonic()
        self.resumed_from = 0
        self._buffer: list[tuple] = []
        self._skips: list[tuple] = []
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = read_header(self.partial)
        if (header and header["identity"] == identity and header["split"] == split
                and header["fingerprint"] == fingerprint and set(header["layers"]) == set(dims)
                and header["provenance"].get("dims") == provenance.get("dims")):
            self.file = h5py.File(self.partial, "a")
            self._truncate(int(self.file.attrs["n_rows"]))
            self.resumed_from = int(self.file.attrs["next_index"])
        else:
            self.file = self._create(identity, split, fingerprint, provenance, dims)
        self.next_index = self.resumed_from
        self.saved_rows = int(self.file["labels"].shape[0])

    def _create(self, identity, split, fingerprint, provenance, dims) -> h5py.File:
        free = shutil.disk_usage(self.partial.parent).free
        if free < _SPACE_MARGIN:
            raise OSError(errno.ENOSPC, f"No space left on device ({free // 1024} KiB free)")
        try:
            f = h5py.File(self.partial, "w")
            for layer, dim in dims.items():
                rows = min(2048, max(1, _CHUNK_BYTES // (dim * self.dtype.itemsize)))
                f.create_dataset(f"features/{layer}", shape=(0, dim), maxshape=(None, dim), dtype=self.dtype,
                                 chunks=(rows, dim))
            columns = (("labels", np.int64), ("index", np.int64)) + ((("paths", _STR),) if self.has_paths else ())
            for name, dt in columns:
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
            for name, dt in _SKIP_COLUMNS:
                f.create_dataset(f"skipped/{name}", shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,))
            f.attrs.update({**identity.to_attrs(), "split": split, "fingerprint": fingerprint, "complete": False,
                            "provenance": json.dumps(provenance, sort_keys=True), "versions": json.dumps(versions()),
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "next_index": 0, "n_rows": 0})
            f.flush()
            return f
        except (OSError, RuntimeError) as e:  # h5py reports a full disk on flush as RuntimeError
            self.partial.unlink(missing_ok=True)
            raise OSError(errno.ENOSPC if "space" in str(e).lower() or "flush" in str(e).lower() else errno.EIO,
                          f"cannot create the cache file ({_first_line(e)})") from None

    def _columns(self) -> list:
        f = self.file
        return list(f["features"].values()) + [f["labels"], f["index"]] + ([f["paths"]] if "paths" in f else [])

    def _truncate(self, n: int) -> None:
        """Drop rows written after the last recorded flush (a crash between data and attributes)."""
        f = self.file
        for ds in self._columns():
            if ds.shape[0] != n:
                ds.resize(n, axis=0)
        n_skip = min(len(f[f"skipped/{name}"]) for name, _ in _SKIP_COLUMNS)
        for name, _ in _SKIP_COLUMNS:
            f[f"skipped/{name}"].resize(n_skip, axis=0)

    @property
    def n_rows(self) -> int:
        return int(self.file["labels"].shape[0]) + sum(len(b[1]) for b in self._buffer)

    def append(self, features: dict[str, np.ndarray], labels, index, paths=None, next_index: int | None = None):
        """Queue a batch of rows; `next_index` is the source position after this batch."""
        self._buffer.append((features, np.asarray(labels, np.int64), np.asarray(index, np.int64), paths))
        if next_index is not None:
            self.next_index = next_index
        if (sum(len(b[1]) for b in self._buffer) >= self.flush_rows
                or time.monotonic() - self._last_flush >= self.flush_seconds):
            self.flush()

    def skip(self, index: int, path: str | None, reason: str, label: int = -1) -> None:
        self._skips.append((index, label, path or "", reason))

    def _ensure_space(self) -> None:
        """Refuse to write when the disk cannot take it: a failed HDF5 write can corrupt the file."""
        n = sum(len(b[1]) for b in self._buffer)
        start = self.file["labels"].shape[0]
        datasets = self._columns()
        need = _SPACE_MARGIN + len(self._skips) * 512 + n * 256  # path strings live in the global heap
        for ds in datasets:  # HDF5 allocates whole chunks
            rows = ds.chunks[0]
            new_chunks = -(-(start + n) // rows) - -(-start // rows)
            need += new_chunks * rows * int(np.prod(ds.chunks[1:])) * ds.dtype.itemsize
        free = shutil.disk_usage(self.partial.parent).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device ({free // 1024} KiB free, "
                                        f"about {need // 1024} KiB needed)")

    def flush(self) -> None:
        """Write queued rows, then record progress; a crash after this loses nothing before it."""
        f = self.file
        self._ensure_space()
        if self._buffer:
            labels = np.concatenate([b[1] for b in self._buffer])
            start, n = f["labels"].shape[0], len(labels)
            for layer, ds in f["features"].items():
                ds.resize(start + n, axis=0)
                ds[start:] = np.concatenate([b[0][layer] for b in self._buffer]).astype(self.dtype, copy=False)
            for name, values in (("labels", labels), ("index", np.concatenate([b[2] for b in self._buffer]))):
                f[name].resize(start + n, axis=0)
                f[name][start:] = values
            if "paths" in f:
                f["paths"].resize(start + n, axis=0)
                f["paths"][start:] = [p for b in self._buffer for p in b[3]]
            self._buffer.clear()
        if self._skips:
            start = f["skipped/index"].shape[0]
            for col, (name, _) in enumerate(_SKIP_COLUMNS):
                f[f"skipped/{name}"].resize(start + len(self._skips), axis=0)
                f[f"skipped/{name}"][start:] = [s[col] for s in self._skips]
            self._skips.clear()
        self.saved_rows = f["labels"].shape[0]
        f.attrs["n_rows"] = self.saved_rows
        f.attrs["next_index"] = self.next_index
        f.flush()
        self._last_flush = time.monotonic()

    def finish(self) -> Path:
        """Flush, mark complete and move the partial file into place atomically."""
        self.flush()
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.path)
        return self.path

    def close(self, flush: bool = True) -> None:
        """Close, keeping the partial file for a later resume; flush=False drops rows not yet written."""
        if self.file.id.valid:
            try:
                if flush:
                    self.flush()
            finally:
                self.file.close()


def write_features(identity: FeatureIdentity, cache_dir, split: str, features: dict[str, np.ndarray], labels,
                   index=None, provenance: dict | None = None, paths=None, fingerprint: str = "") -> Path:
    """Write a complete cache file in one go (tests, imports from other tools); returns its path."""
    labels = np.asarray(labels, np.int64)
    index = np.arange(len(labels)) if index is None else index
    provenance = dict(provenance or {})
    provenance.setdefault("dims", {k: int(v.shape[1]) for k, v in features.items()})
    path = identity.with_taps(features).cache_path(cache_dir, split)
    with lock_for(path):
        writer = CacheWriter(path, identity.with_taps(features), split, fingerprint, provenance, provenance["dims"],
                             has_paths=paths is not None)
        writer.append(features, labels, index, paths, next_index=len(labels))
        return writer.finish()


def _column(f: h5py.File, name: str) -> np.ndarray:
    """A skipped/ column; files written before labels were recorded there read as -1."""
    return f[name][()] if name in f else np.full(len(f["skipped/index"]), -1)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _require_complete(path: Path) -> None:
    if path.name.endswith(PARTIAL) or (not path.exists() and partial_path(path).exists()):
        header = read_header(path if path.name.endswith(PARTIAL) else partial_path(path))
        done = f" ({header['n_rows']} rows so far)" if header and not header["damaged"] else ""
        raise UserError(f"cache {path} is incomplete{done}: rerun the same extract command to finish it")
    if not path.exists():
        raise UserError(f"no cache file at {path}: run `python -m extract` first")


def load_features(path=None, layer: str | None = None, lazy: bool = False, *, data: str | None = None,
                  model: str | None = None, split: str = "train", cache_dir="cache", precision: str | None = None,
                  dtype: str | None = None, image_size: int | None = None, normalize: str | None = None) -> Features:
    """Read one tap of a complete cache: X (N, D), y (N,) and metadata.

    Give the file's path, or the request that made it (``data="digits", model="efficientnet_lite0",
    split="train"``; `precision`/`dtype`/`image_size`/`normalize` choose among several extractions of one model).
    With lazy=True, X is an open h5py.Dataset read on demand (slice it in chunks for large caches).
    """
    if path is None:
        from .catalog import find_one
        path = find_one(cache_dir, data=data, model=model, split=split, layer=layer, precision=precision,
                        dtype=dtype, image_size=image_size, normalize=normalize)
    path = Path(path)
    _require_complete(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(damaged_message(path, _first_line(e))) from None
    try:
        if not f.attrs.get("complete", False) or "features" not in f:
            raise UserError(f"cache {path} is incomplete: rerun the same extract command to finish it")
        identity = FeatureIdentity.from_attrs(f.attrs)
        if identity is None:
            raise UserError(f"cache {path} was written by an older featprobe: rerun the extract command with "
                            "--overwrite to rebuild it")
        layers = sorted(f["features"].keys())
        provenance = _attr_json(f, "provenance")
        layer = layer or identity.taps[0]
        if layer not in layers:
            raise UserError(f"cache {path} has no layer {layer!r}; it has {', '.join(layers)}")
        X = f[f"features/{layer}"] if lazy else f[f"features/{layer}"][()]
        y = f["labels"][()]
        paths = [_text(p) for p in f["paths"][()]] if "paths" in f else None
        skipped = [{"index": int(i), "label": int(lab), "path": _text(p), "reason": _text(r)}
                   for i, lab, p, r in zip(*(_column(f, f"skipped/{name}") for name, _ in _SKIP_COLUMNS))]
        meta = {"path": str(path), "layer": layer, "layers": layers, "identity": identity,
                "split": str(f.attrs.get("split", "")), "fingerprint": str(f.attrs.get("fingerprint", "")),
                "provenance": provenance, "versions": _attr_json(f, "versions"),
                "classes": provenance.get("classes", []), "index": f["index"][()], "paths": paths,
                "skipped": skipped, "created": str(f.attrs.get("created", "")), "dtype": identity.dtype,
                "model": identity.model, "dataset": identity.data.label}
    except UserError:
        f.close()
        raise
    except (OSError, KeyError, ValueError) as e:
        f.close()
        raise UserError(damaged_message(path, _first_line(e))) from None
    if not lazy:
        f.close()
    else:
        meta["file"] = f
    return Features(X, y, meta)


def iter_rows(path, layer: str | None = None, rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (X, y) blocks of a complete cache without loading it whole."""
    feats = load_features(path, layer, lazy=True)
    try:
        for start in range(0, len(feats.y), rows):
            yield feats.X[start:start + rows], feats.y[start:start + rows]
    finally:
        feats.meta["file"].close()
