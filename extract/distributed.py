"""torchrun: the ranks of one extraction, from the environment torchrun sets.

`torchrun --nproc-per-node N -m extract ...` starts N processes with RANK, WORLD_SIZE and
LOCAL_RANK set. Each rank computes its contiguous share of a split's missing chunks on its own
device (cuda:LOCAL_RANK, or the CPU with gloo); rank 0 alone takes the cache lock, decides what
is missing (broadcast, so every rank sees the same list) and assembles the file. A plain
`python -m extract` is a world of one, with no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

# Rank 0 assembles while the others wait at a barrier: a large split takes longer than gloo's
# and NCCL's default 30 minutes.
_TIMEOUT = timedelta(hours=24)


@dataclass(frozen=True)
class Ranks:
    """This process's place among the extraction's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def broadcast(self, value):
        """Rank 0's `value`, on every rank."""
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

    def device(self, device: str) -> str:
        """The device this rank runs on: cuda:LOCAL_RANK where CUDA is asked for (or auto picks it)."""
        if self.world == 1 or device.startswith("cuda:") or device in ("cpu", "mps"):
            return device
        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def ranks_from_env(device: str = "auto") -> Ranks:
    """The ranks torchrun set up (joining its process group once), or a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.distributed.is_initialized():
        on_gpu = ranks.device(device).startswith("cuda")
        if on_gpu:
            torch.cuda.set_device(ranks.local_rank)
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo", timeout=_TIMEOUT)
    return ranks


def leave_process_group() -> None:
    """Leave torchrun's process group, if this process joined one (at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
