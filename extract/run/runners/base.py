"""What a runner is: something that computes a split's missing chunks and returns what it did."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from extract.compute.engine import RunStats, compute_threads, default_workers
from extract.run.job import SplitJob, compute
from extract.run.plan import Plan
from extract.store.identity import FeatureIdentity


@dataclass(frozen=True)
class Work:
    """One split's chunks to compute: the plan, this split's identity and backbone, and where it goes."""

    plan: Plan
    identity: FeatureIdentity
    backbone: object                 # extract.registry.backbone.Backbone
    cache_path: Path
    desc: str                        # progress bar label


class Runner:
    """Computes chunks of a split. A new runner is a subclass in its own file plus one
    `register_runner` line in `extract.run.runners` (or a call from the user's own code).

    Runners that span several processes also say which one assembles the file (`leader`) and keep
    them in step (`barrier`, `broadcast`); a runner in one process keeps these defaults.
    """

    name = ""
    leader = True
    world = 1
    local = True        # computes in this process, where --compile can apply

    def device(self, requested: str) -> str:
        """The --device this process runs on (torchrun: one GPU per rank)."""
        return requested

    def barrier(self) -> None:
        pass

    def broadcast(self, value):
        """The leader's `value`, in every process."""
        return value

    def resources(self, plan: Plan) -> tuple[int, int | None]:
        """(decode workers, torch CPU threads or None) for a local run of `plan`."""
        workers = plan.request.workers
        workers = default_workers(plan.device) if workers is None else workers
        return workers, compute_threads(workers) if plan.device.type == "cpu" else None

    def compute(self, job: SplitJob, work: Work, chunks: list[int]) -> RunStats:
        """Compute `chunks` of `job`, saving each as it completes; returns what was computed (its
        `provenance`: what ran, for the cache file)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def compute_here(job: SplitJob, work: Work, chunks: list[int], workers: int, threads: int | None) -> RunStats:
    """Compute `chunks` in this process with the plan's engine."""
    plan, request = work.plan, work.plan.request
    embedder = plan.embedder(work.backbone, work.identity, work.cache_path, threads)
    stats = compute(job, embedder, chunks, batch_size=plan.batch_size, workers=workers, on_error=request.on_error,
                    progress=request.progress, desc=work.desc, decoder=work.identity.decoder or "auto",
                    threads=threads)
    stats.provenance = {**embedder.provenance(), "device": str(plan.device), "workers": workers,
                        "torch_threads": threads}
    return stats
