"""Where each head runs: scikit-learn or torch, on which device, and whether the features stay on disk.

The in-memory path holds about IN_MEMORY_COPIES float32 copies of the selected splits (the loaded
arrays, their scaled copy, the train+val copy the refit is given). When that does not fit, the
features are streamed from the cache, which only logreg on torch and knn can do.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from extract.store.cache import feature_shape
from extract.core.errors import UserError

from probe.heads.catalog import Head, build_torch_logreg, get_head
from probe.protocol.splits import split_roles

IN_MEMORY_COPIES = 3
SOLVERS = ("auto", "sklearn", "torch")
GB = 1e9


@dataclass(frozen=True)
class Memory:
    """Bytes the in-memory path needs for the selected features, and bytes it may use."""

    need: int
    available: int

    @property
    def fits(self) -> bool:
        return self.need <= self.available

    def describe(self) -> str:
        return f"about {_size(self.need)}, {_size(self.available)} available"


def _size(nbytes: int) -> str:
    return f"{nbytes / GB:.1f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


def available_memory() -> int:
    """Bytes of RAM free for use now: MemAvailable, capped by a cgroup v2 memory limit."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        free = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines() if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, free)


def feature_bytes(files: dict, layer: str | None = None) -> int:
    """float32 bytes of the splits a probe reads (train, validation, test), from the caches' shapes."""
    roles = split_roles(files) or ("train", None)
    total = 0
    for split in {"train", *(r for r in roles if r)}:
        n, d = feature_shape(files[split], layer)
        total += n * d * 4
    return total


def memory_for(files: dict, layer: str | None = None, max_memory_gb: float | None = None) -> Memory:
    """What the in-memory path would need for these cache files, against RAM (or `max_memory_gb`)."""
    limit = int(max_memory_gb * GB) if max_memory_gb is not None else available_memory()
    return Memory(IN_MEMORY_COPIES * feature_bytes(files, layer), limit)


def check_solver(names, solver: str) -> None:
    """--solver sklearn|torch is logreg's choice; other heads have one implementation each."""
    if solver not in SOLVERS:
        raise UserError(f"unknown --solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    others = [n for n in names if n != "logreg"]
    if solver != "auto" and others:
        raise UserError(f"--solver {solver} applies only to --head logreg, not {', '.join(others)} "
                        "(leave --solver at auto for other heads)")


def place(head: Head | str, *, solver: str = "auto", device: str = "auto", scale: str | None = None,
          streamed: bool = False, memory: Memory | None = None) -> Head:
    """The head configured to run: logreg on torch when asked, or when auto finds CUDA or streamed
    features; knn on `device`. A head that cannot take streamed features is a UserError."""
    from probe.heads.device import resolve_device, wants_cuda

    head = get_head(head) if isinstance(head, str) else head
    check_solver([head.name], solver)
    scale = scale or head.default_scale
    if head.name == "logreg" and head.solver == "sklearn":
        if solver == "torch" or (solver == "auto" and (streamed or wants_cuda(device))):
            dev = resolve_device(device)
            head = replace(head, build=partial(build_torch_logreg, device=str(dev), scale=scale), solver="torch",
                           device=str(dev), streams=True, scales_itself=True,
                           description="multinomial L2 logistic regression (L-BFGS on torch)")
    elif head.name == "knn":
        dev = resolve_device(device)
        head = replace(head, build=partial(head.build, device=str(dev)), device=str(dev),
                       scales_itself=streamed and scale in ("l2", "none"))  # cosine similarity normalises rows
        if streamed and scale == "standard":
            raise UserError(f"knn with --scale standard needs the features in memory ({_needs(memory)}); it "
                            "streams them from the cache with --scale none or l2")
    if streamed and not head.streams:
        what = f"{head.name} with --solver sklearn" if head.name == "logreg" else head.name
        raise UserError(f"{what} needs the features in memory ({_needs(memory)}); use --head logreg --solver "
                        "torch or --head knn, which stream them from the cache")
    return head


def _needs(memory: Memory | None) -> str:
    return memory.describe() if memory else "more than is available"
