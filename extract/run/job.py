"""One split's extraction as chunks: what each chunk must compute, and computing some of them here.

Every way of running (one process, torchrun ranks, Ray actors) computes chunks of a `SplitJob`
with the same batches (each chunk's positions to compute, cut into `batch_size` in order), so
they all give the same rows; `extract.store.assemble` then writes the cache file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import BatchSampler

from extract.store.chunks import ChunkStore, Rows, chunk_range
from extract.compute.engine import RunStats, run
from extract.store.identity import FeatureIdentity
from extract.store.incremental import Reuse


@dataclass
class SplitJob:
    """A split to extract: its identity and images, the chunk store, and what is reused."""

    identity: FeatureIdentity
    source: object                 # extract.registry.datasets.ImageSource
    stamps: np.ndarray | None      # (N, 2) size, mtime_ns of each file; None for in-memory arrays
    fingerprint: str
    store: ChunkStore
    reuse: Reuse
    dims: dict[str, int]
    provenance: dict

    def todo(self, k: int) -> np.ndarray:
        """Positions of chunk `k` whose features must be computed."""
        r = chunk_range(k, self.store.chunk_rows, self.store.n)
        pos = np.arange(r.start, r.stop)
        return pos[(self.reuse.row[pos] < 0) & (self.reuse.skip[pos] < 0)]

    def missing(self) -> list[int]:
        """Chunks with work to do and no finished file, in order."""
        done = self.store.done()
        return [k for k in range(self.store.total) if k not in done and len(self.todo(k))]

    def batches(self, chunks, batch_size: int) -> list[list[int]]:
        """The batches of `chunks`: never crossing a chunk, the same on every runner."""
        return [b for k in chunks for b in BatchSampler(self.todo(k).tolist(), batch_size, False)]


def share(chunks: list[int], rank: int, world: int) -> list[int]:
    """Rank `rank`'s contiguous share of `chunks` (sizes differ by at most one; none is repeated)."""
    per, extra = divmod(len(chunks), world)
    start = rank * per + min(rank, extra)
    return chunks[start:start + per + (rank < extra)]


class ChunkSink:
    """Collects a run's batches and saves each chunk as soon as all its positions have arrived."""

    def __init__(self, job: SplitJob, chunks: list[int]):
        self.job = job
        self.expected = {k: len(job.todo(k)) for k in chunks}
        self.parts: dict[int, list[Rows]] = {}
        self.seen = dict.fromkeys(chunks, 0)
        self.written = 0

    def add(self, features, kept, n, skipped) -> None:
        source, stamps = self.job.source, self.job.stamps
        first = int(kept[0]) if len(kept) else skipped[0][0]
        k = first // self.job.store.chunk_rows
        paths = [source.paths[i] for i in kept] if source.paths is not None else None
        skips = [(pos, int(source.labels[pos]), path, reason, *self._stamp(pos)) for pos, path, reason in skipped]
        self.parts.setdefault(k, []).append(Rows(features, source.labels[kept], np.asarray(kept, np.int64), paths,
                                                 stamps[kept] if stamps is not None else None, skips))
        self.seen[k] += n
        if self.seen[k] == self.expected[k]:
            rows = Rows.join(self.parts.pop(k), self.job.dims, source.paths is not None)
            self.job.store.write(k, rows)
            self.written += 1

    def _stamp(self, pos: int) -> tuple[int, int]:
        return tuple(int(v) for v in self.job.stamps[pos]) if self.job.stamps is not None else (-1, -1)


def compute(job: SplitJob, embedder, chunks: list[int], *, batch_size: int, workers: int, on_error: str,
            progress: bool, desc: str, decoder: str, threads: int | None) -> RunStats:
    """Compute `chunks` of `job` in this process, saving each as it completes."""
    sink = ChunkSink(job, chunks)
    return run(embedder, job.source, sink, job.batches(chunks, batch_size), workers=workers, on_error=on_error,
               progress=progress, desc=desc, decoder=decoder, threads=threads)
