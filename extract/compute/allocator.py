"""Keep glibc's malloc from giving large buffers back to the OS after every operator.

A CNN forward on the CPU allocates and frees activation buffers of several MiB per layer. glibc
serves blocks above its mmap threshold with a fresh mmap and returns them with munmap on free
(and trims the top of the heap above M_TRIM_THRESHOLD), so every layer of every batch faults
its pages in again and the process spends much of its time in the kernel zeroing pages.
`tune_malloc` turns that off for the process (no mmap for allocations, no trimming): freed
buffers stay in the heap and the next batch reuses them. The price is a higher resident set
(peak memory is kept rather than returned).

Linux with glibc only; a no-op elsewhere. `FEATPROBE_MALLOC_TUNING=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

ENV = "FEATPROBE_MALLOC_TUNING"
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1   # mallopt takes a C int: the largest one, i.e. "never trim"

_lock = threading.Lock()
_applied = False


def wanted() -> bool:
    """False when the environment turns the tuning off (FEATPROBE_MALLOC_TUNING=0/false/no/off)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _mallopt():
    """libc's mallopt, or None where this is not glibc on Linux."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def tune_malloc() -> bool:
    """Apply the tuning once per process; True when it is in effect (now or from an earlier call).

    Harmless to call repeatedly and from several places; returns False (and changes nothing) off
    glibc or when FEATPROBE_MALLOC_TUNING turns it off.
    """
    global _applied
    with _lock:
        if _applied:
            return True
        if not wanted():
            return False
        mallopt = _mallopt()
        if mallopt is None:
            return False
        # mallopt returns 1 on success; both must hold for the tuning to mean anything
        _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
        return _applied


def malloc_tuned() -> bool:
    """Whether `tune_malloc` is in effect in this process (for provenance)."""
    return _applied
