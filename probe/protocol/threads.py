"""How many BLAS/OpenMP threads a fit gets when --n-jobs is not given.

The libraries' default is one thread per logical CPU. On a machine where other processes keep
cores busy, threads that wait for each other (OpenBLAS, OpenMP barriers) wait for a descheduled
sibling at every call, and a fit can take ten times longer than on one thread (measured in
README, "Threads on a busy machine"). So the default is: the physical cores this process may use
(CPU affinity, cgroup quota), less the cores other processes kept busy over a short look at
/proc/stat, at most MAX_THREADS and at least one.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

MAX_THREADS = 8          # BLAS-bound heads gain little beyond this; more threads more often wait
LOOK_SECONDS = 0.2       # how long other processes' CPU use is sampled
REMEMBER_SECONDS = 30.0  # a sample serves the fits that follow for this long
_memo: dict = {}


def allowed_cpus() -> list[int]:
    """The logical CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int]) -> int:
    """Physical cores among `cpus` (hyperthread siblings counted once); len(cpus) where unknown."""
    seen = set()
    for cpu in cpus:
        try:
            seen.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return len(seen) or len(cpus)


def quota_cores() -> float | None:
    """The cgroup's CPU quota in cores (v2 cpu.max or v1 cfs_quota_us), None without one."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def usable_cores() -> int:
    """Physical cores this process may use: affinity, hyperthreads counted once, the cgroup quota."""
    cores = physical_cores(allowed_cpus())
    quota = quota_cores()
    return max(1, min(cores, math.floor(quota)) if quota else cores)


def _busy_ticks(cpus: list[int]) -> tuple[int, int] | None:
    """(busy, total) clock ticks of these CPUs so far, from /proc/stat; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cpus}
    busy = total = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [int(v) for v in fields[1:9]]   # user nice system idle iowait irq softirq steal
            total += sum(ticks)
            busy += sum(ticks) - ticks[3] - ticks[4]
    return (busy, total) if total else None


def others_busy(seconds: float = LOOK_SECONDS) -> float | None:
    """Cores kept busy by other processes (and the hypervisor: steal) over `seconds`; None where
    /proc/stat is not there. This process's own CPU time in that window is left out."""
    cpus = allowed_cpus()
    before, own_before = _busy_ticks(cpus), time.process_time()
    if before is None:
        return None
    time.sleep(seconds)
    after, own_after = _busy_ticks(cpus), time.process_time()
    if after is None or after[1] <= before[1]:
        return None
    share = (after[0] - before[0]) / (after[1] - before[1])      # of every allowed CPU's time
    own = (own_after - own_before) / seconds
    return max(0.0, share * len(cpus) - own)


def default_threads() -> int:
    """Usable physical cores less the ones other processes keep busy now (rounded to the nearest
    core), at least 1 and at most MAX_THREADS; remembered for REMEMBER_SECONDS."""
    now = time.monotonic()
    if _memo and now - _memo["at"] < REMEMBER_SECONDS:
        return _memo["threads"]
    cores = usable_cores()
    busy = others_busy() if cores > 1 else 0.0
    free = cores if busy is None else math.floor(cores - busy + 0.5)
    threads = max(1, min(MAX_THREADS, free))
    _memo.update(at=now, threads=threads, cores=cores, busy=busy)
    return threads
