"""The HDF5 feature cache: the writer of complete files, a reader that trusts only those, a lock.

One file per feature identity and split (`FeatureIdentity.cache_path`); it may hold several taps.

    features/<tap>    (N, D)  float32 or float16, chunked
    labels            (N,)    int64
    index             (N,)    int64   row -> position in the source split
    paths, stamps     (N,), (N, 2)    only where the images are files: path, (size, mtime_ns)
    skipped/index, label, path, reason, size, mtime    unreadable images

Attributes: `identity` (JSON, see extract.store.identity) with flat copies (model, dataset, precision,
dtype, format), `split`, `fingerprint` (of the split's images), `complete`, `provenance` (JSON),
`versions` (JSON), `created`, `n_rows`. Unfinished work lives in extract.store.chunks, not here.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, NamedTuple

import h5py
import numpy as np
from filelock import FileLock, Timeout

from extract.core.atomic import write_text_atomic
from extract.core.errors import UserError
from extract.core.filehash import remember_sha256, sha256_file
from extract.core.version import __version__
from extract.store.chunks import PARTIAL, ChunkStore, Rows, as_text, partial_path, text_column
from extract.store.identity import FeatureIdentity

_STR = h5py.string_dtype("utf-8")
_CHUNK_BYTES = 256 * 1024
_SPACE_MARGIN = 256 * 1024
_SKIP_COLUMNS = (("index", np.int64), ("label", np.int64), ("path", _STR), ("reason", _STR), ("size", np.int64),
                 ("mtime", np.int64))


class Features(NamedTuple):
    """What a cache file holds for one tap: X (N, D), y (N,), and everything else in meta."""

    X: np.ndarray
    y: np.ndarray
    meta: dict


def check_cache_root(root) -> None:
    """A cache root that is, or lies under, a file is a UserError naming it."""
    root = Path(root)
    for folder in (root, *root.parents):
        if folder.exists():
            if not folder.is_dir():
                raise UserError(f"--cache-dir {root} is not a folder: {folder} is a file")
            return


def _unwritable(folder, e: OSError) -> UserError:
    return UserError(f"cannot write in {folder} ({e.strerror or e}); features that are not cached yet need a "
                     "writable --cache-dir")


def lock_for(path, timeout: float = -1) -> FileLock:
    """An inter-process lock guarding one cache file (final and partial alike)."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _unwritable(Path(path).parent, e) from None
    return FileLock(str(path) + ".lock", timeout=timeout)


def missing_dirs(folder) -> list[Path]:
    """The folders from `folder` upwards that do not exist yet, deepest first (what lock_for will make)."""
    out, d = [], Path(folder)
    while not d.exists() and d != d.parent:
        out.append(d)
        d = d.parent
    return out


def discard_unused(lock: FileLock, created: list[Path]) -> None:
    """After a split that wrote nothing: its lock file, a chunk folder holding no finished chunk, and
    the folders made for it (`created`, from missing_dirs before lock_for), when nothing else is in
    them; folders that were there stay."""
    lock_file = Path(lock.lock_file)
    if not created or lock_file.parent != created[0]:
        return
    partial = partial_path(Path(str(lock_file)[:-len(".lock")]))
    empty_partial = partial.is_dir() and all(p.name == "manifest.json" for p in partial.iterdir())
    if any(p != lock_file and not (p == partial and empty_partial) for p in lock_file.parent.iterdir()):
        return
    if empty_partial:
        shutil.rmtree(partial, ignore_errors=True)
    lock_file.unlink(missing_ok=True)
    for d in created:
        try:
            d.rmdir()
        except OSError:   # something else was written there meanwhile
            return


def acquire(lock: FileLock, path, notify) -> None:
    """Take the file's lock, saying so if another process holds it and we have to wait; a folder where
    the lock cannot be created is a UserError."""
    try:
        lock.acquire(timeout=0)
    except Timeout:
        notify(f"waiting for another process writing {path}")
        lock.acquire()
    except OSError as e:
        raise _unwritable(Path(path).parent, e) from None


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
        out["featprobe"] = __version__
    return out


def _attr_json(f: h5py.File, name: str) -> dict:
    raw = f.attrs.get(name)
    return json.loads(raw) if raw is not None else {}


def digest_path(path) -> Path:
    """The file beside a cache file holding its sha256, written when the cache was completed."""
    return Path(str(path) + ".sha256")


def _content_changed(path: Path) -> str | None:
    """Why the file is not the one that was written (its recorded sha256 differs), or None. Hashes are
    remembered per (path, size, mtime), so an unchanged file is hashed once (extract.core.filehash)."""

    try:
        expected = digest_path(path).read_text().strip()
    except OSError:   # written before digests were recorded, or the digest could not be written
        return None
    if expected and sha256_file(path) != expected:
        return "its content changed since it was written (sha256 differs)"
    return None


def _check_structure(f: h5py.File) -> None:
    """Every column has one row per image: reads the metadata of each dataset (its checksums included)."""
    n = int(f.attrs.get("n_rows", 0))
    columns = [*f["features"].values(), *(f[name] for name in ("labels", "index", "paths", "stamps") if name in f)]
    for ds in columns:
        if ds.shape[0] != n:
            raise ValueError(f"{ds.name} has {ds.shape[0]} rows, the file records {n}")
    lengths = {f[f"skipped/{name}"].shape[0] for name, _ in _SKIP_COLUMNS}
    if len(lengths) != 1:
        raise ValueError("the skipped/ columns differ in length")


def read_header(path) -> dict | None:
    """Identity, provenance, taps and completeness of a cache file; None if absent.

    A file that exists but cannot be read, whose structure is inconsistent or whose content is not what
    was written (see `digest_path`) has `damaged` set to the reason.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        # Unlocked read: a writer may hold the file open; writers are serialised by lock_for().
        with h5py.File(path, "r", locking=False) as f:
            identity = FeatureIdentity.from_attrs(f.attrs)
            if identity is None and f.attrs.get("identity") is not None:
                raise ValueError("its identity attribute cannot be read")
            complete = bool(f.attrs.get("complete", False))
            if complete and identity is not None:
                _check_structure(f)
            header = {"identity": identity, "split": str(f.attrs.get("split", "")),
                      "fingerprint": str(f.attrs.get("fingerprint", "")), "provenance": _attr_json(f, "provenance"),
                      "complete": complete, "layers": sorted(f["features"].keys()) if "features" in f else [],
                      "n_rows": int(f.attrs.get("n_rows", 0)),
                      "created": str(f.attrs.get("created", "")), "versions": _attr_json(f, "versions"),
                      "damaged": None}
    except Exception as e:  # noqa: BLE001 - h5py reports damage as OSError, RuntimeError, KeyError, ValueError...
        return {"identity": None, "complete": False, "layers": [], "n_rows": 0, "damaged": _first_line(e)}
    changed = _content_changed(path) if header["complete"] else None
    if changed:
        return {**header, "identity": None, "complete": False, "damaged": changed}
    return header


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def damaged_message(path, reason: str) -> str:
    return (f"cache {path} is damaged ({reason}): delete it and rerun the same `python -m extract` command "
            "to rebuild it")


class CacheWriter:
    """Write the rows of a split, in source order, into a new file `tmp`; `finish` marks it complete
    and moves it to the cache path atomically (extract.store.assemble feeds it chunk by chunk)."""

    def __init__(self, tmp, identity: FeatureIdentity, split: str, fingerprint: str, provenance: dict,
                 dims: dict[str, int], *, has_paths: bool = True):
        self.tmp = Path(tmp)
        self.dtype = np.dtype(identity.dtype)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.tmp.parent).free
        if free < _SPACE_MARGIN:
            raise OSError(errno.ENOSPC, f"No space left on device ({free // 1024} KiB free)")
        try:
            self.file = f = h5py.File(self.tmp, "w")
            for layer, dim in dims.items():
                rows = min(2048, max(1, _CHUNK_BYTES // (dim * self.dtype.itemsize)))
                f.create_dataset(f"features/{layer}", shape=(0, dim), maxshape=(None, dim), dtype=self.dtype,
                                 chunks=(rows, dim))
            columns = (("labels", np.int64), ("index", np.int64)) + ((("paths", _STR),) if has_paths else ())
            for name, dt in columns:
                f.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(4096,))
            if has_paths:
                f.create_dataset("stamps", shape=(0, 2), maxshape=(None, 2), dtype=np.int64, chunks=(4096, 2))
            for name, dt in _SKIP_COLUMNS:
                f.create_dataset(f"skipped/{name}", shape=(0,), maxshape=(None,), dtype=dt, chunks=(256,))
            f.attrs.update({**identity.to_attrs(), "split": split, "fingerprint": fingerprint, "complete": False,
                            "provenance": json.dumps(provenance, sort_keys=True), "versions": json.dumps(versions()),
                            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "n_rows": 0})
        except (OSError, RuntimeError) as e:  # h5py reports a full disk on flush as RuntimeError
            self.discard()
            raise OSError(errno.ENOSPC if "space" in str(e).lower() or "flush" in str(e).lower() else errno.EIO,
                          f"cannot create the cache file ({_first_line(e)})") from None

    def _columns(self) -> list:
        f = self.file
        return list(f["features"].values()) + [f[n] for n in ("labels", "index", "paths", "stamps") if n in f]

    @property
    def n_rows(self) -> int:
        return int(self.file["labels"].shape[0])

    def _ensure_space(self, n: int, n_skips: int) -> None:
        """Refuse to write when the disk cannot take it: a failed HDF5 write can corrupt the file."""
        start = self.n_rows
        need = _SPACE_MARGIN + n_skips * 512 + n * 256  # path strings live in the global heap
        for ds in self._columns():  # HDF5 allocates whole chunks
            rows = ds.chunks[0]
            new_chunks = -(-(start + n) // rows) - -(-start // rows)
            need += new_chunks * rows * int(np.prod(ds.chunks[1:])) * ds.dtype.itemsize
        free = shutil.disk_usage(self.tmp.parent).free
        if free < need:
            raise OSError(errno.ENOSPC, f"No space left on device ({free // 1024} KiB free, "
                                        f"about {need // 1024} KiB needed)")

    def append(self, rows) -> None:
        """Add `rows` (an extract.store.chunks.Rows, source order) and their skipped images at the end."""
        f = self.file
        n = len(rows)
        self._ensure_space(n, len(rows.skipped))
        start = self.n_rows
        for layer, ds in f["features"].items():
            ds.resize(start + n, axis=0)
            ds[start:] = np.asarray(rows.features[layer]).astype(self.dtype, copy=False)
        columns = {"labels": rows.labels, "index": rows.index}
        if "paths" in f:
            columns.update(paths=text_column(rows.paths), stamps=np.asarray(rows.stamps, np.int64).reshape(-1, 2))
        for name, values in columns.items():
            f[name].resize(start + n, axis=0)
            f[name][start:] = values
        if rows.skipped:
            at = f["skipped/index"].shape[0]
            for col, (name, _) in enumerate(_SKIP_COLUMNS):
                f[f"skipped/{name}"].resize(at + len(rows.skipped), axis=0)
                column = [s[col] for s in rows.skipped]
                f[f"skipped/{name}"][at:] = text_column(column) if name in ("path", "reason") else column
        f.attrs["n_rows"] = self.n_rows

    def finish(self, path) -> Path:
        """Mark complete and move into place at `path` atomically, then record its sha256 beside it."""


        self.file.attrs["complete"] = True
        self.file.close()
        digest = sha256_file(self.tmp)
        digest_path(path).unlink(missing_ok=True)   # the old file's digest must not vouch for the new one
        os.replace(self.tmp, path)
        remember_sha256(path, digest)
        try:
            write_text_atomic(digest_path(path), digest + "\n")
        except OSError:   # without it the file is still whole; it is only not verifiable
            pass
        return Path(path)

    def discard(self) -> None:
        try:
            if getattr(self, "file", None) is not None and self.file.id.valid:
                self.file.close()
        except Exception:  # noqa: BLE001 - the file is being thrown away
            pass
        self.tmp.unlink(missing_ok=True)


def write_features(identity: FeatureIdentity, cache_dir, split: str, features: dict[str, np.ndarray], labels,
                   index=None, provenance: dict | None = None, paths=None, fingerprint: str = "") -> Path:
    """Write a complete cache file in one go (tests, imports from other tools); returns its path."""
    labels = np.asarray(labels, np.int64)
    index = np.arange(len(labels)) if index is None else np.asarray(index, np.int64)
    provenance = dict(provenance or {})
    provenance.setdefault("dims", {k: int(v.shape[1]) for k, v in features.items()})
    identity = identity.with_taps(features)
    path = identity.cache_path(cache_dir, split)
    stamps = np.full((len(labels), 2), -1, np.int64) if paths is not None else None
    with lock_for(path):
        writer = CacheWriter(Path(str(path) + ".writing"), identity, split, fingerprint, provenance,
                             provenance["dims"], has_paths=paths is not None)
        writer.append(Rows(features, labels, index, None if paths is None else list(paths), stamps))
        return writer.finish(path)


def _column(f: h5py.File, name: str) -> np.ndarray:
    """A skipped/ column; files written before labels were recorded there read as -1."""
    return f[name][()] if name in f else np.full(len(f["skipped/index"]), -1)


def _require_complete(path: Path) -> None:
    if path.name.endswith(PARTIAL) or (not path.exists() and partial_path(path).exists()):
        final = Path(str(path)[:-len(PARTIAL)]) if path.name.endswith(PARTIAL) else path
        store = ChunkStore.existing(final)
        done = f" ({store.rows_done()} rows in {len(store.done())} of {store.total} chunks so far)" if store else ""
        raise UserError(f"cache {final} is incomplete{done}: rerun the same extract command to finish it")
    if not path.exists():
        raise UserError(f"no cache file at {path}: run `python -m extract` first")


def load_features(path, layer: str | None = None, lazy: bool = False) -> Features:
    """Read one tap of the complete cache file at `path`: X (N, D), y (N,) and metadata.

    With lazy=True, X is an open h5py.Dataset read on demand (slice it in chunks for large caches).
    To find a file by the request that made it, see `extract.store.catalog.load_features`.
    """
    path = Path(path)
    _require_complete(path)
    try:
        f = h5py.File(path, "r")
    except Exception as e:  # noqa: BLE001 - not HDF5, or damaged beyond opening
        raise UserError(damaged_message(path, _first_line(e))) from None
    changed = _content_changed(path)
    if changed:
        f.close()
        raise UserError(damaged_message(path, changed))
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
        paths = [as_text(p) for p in f["paths"][()]] if "paths" in f else None
        skipped = [{"index": int(i), "label": int(lab), "path": as_text(p), "reason": as_text(r)}
                   for i, lab, p, r in zip(*(_column(f, f"skipped/{name}") for name, _ in _SKIP_COLUMNS[:4]))]
        meta = {"path": str(path), "layer": layer, "layers": layers, "identity": identity,
                "split": str(f.attrs.get("split", "")), "fingerprint": str(f.attrs.get("fingerprint", "")),
                "provenance": provenance, "versions": _attr_json(f, "versions"),
                "classes": provenance.get("classes", []), "index": f["index"][()], "paths": paths,
                "skipped": skipped, "created": str(f.attrs.get("created", "")), "dtype": identity.dtype,
                "model": identity.model, "dataset": identity.data.label}
    except UserError:
        f.close()
        raise
    except Exception as e:  # noqa: BLE001 - h5py reports damage as OSError, RuntimeError, KeyError, ValueError...
        f.close()
        raise UserError(damaged_message(path, _first_line(e))) from None
    if not lazy:
        f.close()
    else:
        meta["file"] = f
    return Features(X, y, meta)


def feature_shape(path, layer: str | None = None) -> tuple[int, int]:
    """(rows, width) of one tap of a complete cache, read from the dataset's shape alone."""
    path = Path(path)
    _require_complete(path)
    try:
        with h5py.File(path, "r") as f:
            identity = FeatureIdentity.from_attrs(f.attrs)
            layer = layer or (identity.taps[0] if identity else sorted(f["features"])[0])
            if f"features/{layer}" not in f:
                raise UserError(f"cache {path} has no layer {layer!r}; it has {', '.join(sorted(f['features']))}")
            n, d = f[f"features/{layer}"].shape
            return int(n), int(d)
    except UserError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise UserError(damaged_message(path, _first_line(e))) from None


def iter_rows(path, layer: str | None = None, rows: int = 8192) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Stream (X, y) blocks of a complete cache without loading it whole."""
    feats = load_features(path, layer, lazy=True)
    try:
        for start in range(0, len(feats.y), rows):
            yield feats.X[start:start + rows], feats.y[start:start + rows]
    finally:
        feats.meta["file"].close()
