"""torchrun: the ranks of one extraction share its chunks, from the environment torchrun sets.

`torchrun --nproc-per-node N -m extract ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set. Each rank computes its contiguous share of a split's missing chunks on its own
device (cuda:LOCAL_RANK, or the CPU with gloo); rank 0 alone takes the cache lock, decides what
is missing (broadcast, so every rank sees the same list) and assembles the file.

One GPU per rank: more ranks on a node than it has GPUs is refused with one line (`rank_device`)
rather than shared, since NCCL does not put two ranks on one GPU and one GPU gains nothing from a
second rank (its decode workers already feed it).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch

from extract.compute.engine import RunStats, cpu_cores
from extract.core.errors import UserError
from extract.run.job import SplitJob, share
from extract.run.runners.base import Runner, Work, compute_here

# Rank 0 assembles while the others wait at a barrier: a large split takes longer than gloo's
# and NCCL's default 30 minutes.
_TIMEOUT = timedelta(hours=24)


def rank_device(requested: str, local_rank: int, local_world: int, gpus: int) -> str:
    """The --device of rank LOCAL_RANK of the LOCAL_WORLD_SIZE ranks on this node (of several in all)
    on a node with `gpus` GPUs: cuda:LOCAL_RANK where CUDA is asked for or `auto` finds it, else the
    device asked for. A UserError (one line) for CUDA without GPUs, more ranks on the node than GPUs,
    or one cuda:N for several ranks of a node."""
    if requested in ("cpu", "mps"):
        return requested
    if requested == "auto":
        if gpus == 0:
            return "cpu"
        requested = "cuda"
    if not requested.startswith("cuda"):
        return requested   # resolve_device names what is wrong with it
    if gpus == 0:
        raise UserError(f"device {requested} asked for, but CUDA is not available here")
    if requested != "cuda":
        if local_world > 1:
            raise UserError(f"--device {requested} under torchrun would put the {local_world} ranks of this node on "
                            "one GPU: use --device cuda (rank r takes cuda:r), and CUDA_VISIBLE_DEVICES to choose "
                            "the GPUs")
        return requested
    if local_world > gpus:
        raise UserError(f"torchrun started {local_world} ranks on this node, which has {gpus} GPU"
                        f"{'s' if gpus > 1 else ''}: one GPU per rank, so use --nproc-per-node {gpus} "
                        "(or --device cpu)")
    return f"cuda:{local_rank}"


class TorchrunRunner(Runner):
    """This process is rank RANK of WORLD_SIZE: it computes its contiguous share of the missing chunks."""

    name = "torchrun"

    def __init__(self, device: str = "auto"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.leader = self.rank == 0
        if self.world > 1 and not torch.distributed.is_initialized():
            on_gpu = self.device(device).startswith("cuda")
            if on_gpu:
                torch.cuda.set_device(self.local_rank)
            torch.distributed.init_process_group("nccl" if on_gpu else "gloo", timeout=_TIMEOUT)

    def device(self, requested: str) -> str:
        """cuda:LOCAL_RANK where CUDA is asked for (or auto picks it); see `rank_device`."""
        if self.world == 1:
            return requested
        gpus = torch.cuda.device_count() if requested != "cpu" and torch.cuda.is_available() else 0
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        return rank_device(requested, self.local_rank, local_world, gpus)

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value):
        if self.world == 1:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order, on every rank."""
        if self.world == 1:
            return [value]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, value)
        return out

    def resources(self, plan) -> tuple[int, int | None]:
        if plan.device.type != "cpu":
            return super().resources(plan)
        workers = 0 if plan.request.workers is None else plan.request.workers   # the cores are the ranks'
        return workers, max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", self.world)))

    def compute(self, job: SplitJob, work: Work, chunks: list[int]) -> RunStats:
        workers, threads = self.resources(work.plan)
        mine = compute_here(job, work, share(chunks, self.rank, self.world), workers, threads)
        every = self.gather(mine)
        return RunStats(sum(s.images for s in every), max(s.seconds for s in every),
                        [x for s in every for x in s.skipped], {**mine.provenance, "processes": self.world})

    def close(self) -> None:
        leave_process_group()


def leave_process_group() -> None:
    """Leave torchrun's process group, if this process joined one (at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
