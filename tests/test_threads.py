"""The default thread count of the fits: the physical cores other processes leave free."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from probe.protocol import threads
from probe.protocol.search import SMALL, thread_count, threads_for


@pytest.fixture(autouse=True)
def fresh_memo():
    threads._memo.clear()
    yield
    threads._memo.clear()


@pytest.mark.parametrize("cores, busy, want", [(4, 1.2, 3), (4, 0.3, 4), (4, 3.9, 1), (2, 1.0, 1), (2, 0.4, 2),
                                               (4, None, 4), (16, 0.0, threads.MAX_THREADS), (1, 0.0, 1)])
def test_default_threads_leaves_the_cores_others_keep_busy(monkeypatch, cores, busy, want):
    monkeypatch.setattr(threads, "usable_cores", lambda: cores)
    monkeypatch.setattr(threads, "others_busy", lambda seconds=0.2: busy)
    assert threads.default_threads() == want


def test_a_process_burning_a_core_is_seen_and_our_own_work_is_not():
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        assert threads.others_busy(0.5) >= 0.5       # the burner has at least half a core to itself
    finally:
        hog.kill()
        hog.wait()
    t0 = time.process_time()
    busy = threads.others_busy(0.3)
    assert busy is not None and 0 <= busy <= len(threads.allowed_cpus()) and time.process_time() - t0 < 0.1


def test_usable_cores_respects_affinity():
    assert 1 <= threads.usable_cores() <= len(threads.allowed_cpus())


def test_thread_count_and_the_cap_in_force(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(threads, "others_busy", lambda seconds=0.2: 1.0)
    big, small = np.zeros((SMALL // 100 + 1, 100), np.float32), np.zeros((10, 10))
    assert thread_count(small) == 1 and thread_count(big) == 1 and thread_count(big, 3) == 3
    assert thread_count(big, -1) is None
    with threads_for(big):                           # one core left free by the other process: one thread
        assert {i["num_threads"] for i in threadpool_info()} == {1}
