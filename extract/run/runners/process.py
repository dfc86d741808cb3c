"""The default runner: every chunk in this process."""

from __future__ import annotations

from extract.compute.engine import RunStats
from extract.run.job import SplitJob
from extract.run.runners.base import Runner, Work, compute_here


class ProcessRunner(Runner):
    name = "process"

    def compute(self, job: SplitJob, work: Work, chunks: list[int]) -> RunStats:
        workers, threads = self.resources(work.plan)
        return compute_here(job, work, chunks, workers, threads)
