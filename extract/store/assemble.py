"""Join finished chunks, and rows reused from an earlier cache, into the complete cache file.

Chunk by chunk in source order, so memory stays flat in the number of images; the file is built
inside the `.partial` folder and renamed into place, then the folder is removed. Until the
rename, the earlier cache (if any) stays where it was, whole.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

from extract.store.cache import CacheWriter
from extract.store.chunks import as_text
from extract.store.chunks import ChunkStore, Rows, chunk_range
from extract.store.identity import FeatureIdentity
from extract.store.incremental import Reuse


def reused_rows(base: h5py.File, reuse: Reuse, positions: range, source, stamps) -> Rows:
    """Rows of `positions` copied from the base cache (features; labels, paths and stamps are today's)."""
    pos = np.arange(positions.start, positions.stop)
    take = pos[reuse.row[pos] >= 0]
    old = reuse.row[take]
    order = np.argsort(old, kind="stable")
    ascending = old[order]   # h5py reads rows by increasing index only
    features = {}
    for name, ds in base["features"].items():
        features[name] = np.empty((len(take), ds.shape[1]), ds.dtype)
        if len(take):
            lo, hi = int(ascending[0]), int(ascending[-1]) + 1
            # one slice read when the rows lie close together (the usual case), else a point selection
            features[name][order] = ds[lo:hi][ascending - lo] if hi - lo <= 4 * len(take) else ds[ascending]
    paths = [source.paths[i] for i in take]
    skipped = []
    skip_pos = pos[reuse.skip[pos] >= 0]
    if len(skip_pos):
        reasons = base["skipped/reason"]
        for p in skip_pos:
            r = reasons[int(reuse.skip[p])]
            skipped.append((int(p), int(source.labels[p]), source.paths[p], as_text(r),
                            int(stamps[p, 0]), int(stamps[p, 1])))
    return Rows(features, source.labels[take], take, paths, stamps[take], skipped)


def assemble(store: ChunkStore, reuse: Reuse, identity: FeatureIdentity, source, stamps, fingerprint: str,
             provenance: dict, dims: dict[str, int]) -> Path:
    """Write the complete cache file at `store.path` from the chunks and the reused rows; OSError on a
    full disk (the chunks stay)."""
    has_paths = source.paths is not None
    writer = CacheWriter(store.dir / "assembled.h5", identity, source.name, fingerprint, provenance, dims,
                         has_paths=has_paths)
    base = h5py.File(reuse.base, "r", locking=False) if reuse.base is not None else None
    done = store.done()
    try:
        for k in range(store.total):
            positions = chunk_range(k, store.chunk_rows, store.n)
            parts = [store.read(k)] if k in done else []
            if base is not None:
                parts.append(reused_rows(base, reuse, positions, source, stamps))
            writer.append(Rows.join(parts, dims, has_paths))
        if base is not None:
            base.close()
            base = None
        path = writer.finish(store.path)
    except BaseException:
        writer.discard()
        raise
    finally:
        if base is not None:
            base.close()
    store.remove()
    return path
