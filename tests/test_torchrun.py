"""torchrun: ranks share a split's chunks and give the single-process cache; a dead rank's chunks are redone."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from extract import load_features
from extract.store.chunks import ChunkStore
from extract.run.job import share
from test_extract import REPO, cache_file, make_folder

pytestmark = pytest.mark.slow   # subprocesses, clusters and compilers: minutes on 2 cores

ARGS = ["--weights", "none", "--data", "imagefolder", "--precision", "fp32",
        "--batch-size", "4", "--chunk-size", "8", "--no-progress", "--split", "train"]
REQUEST = dict(model="cifar_resnet20", weights="none", data="imagefolder", precision="fp32")


def extract_cli(*args, ranks=0, cwd, model="cifar_resnet20"):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                "--standalone"] if ranks else [sys.executable]
    return subprocess.run([*launcher, "-m", "extract", "--model", model, *ARGS, *args], cwd=cwd,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": REPO}, timeout=300)


def test_bad_input_is_said_once_and_every_rank_exits_2(folder, tmp_path):
    r = extract_cli("--root", str(folder), "--cache-dir", str(tmp_path / "c"), ranks=2, cwd=tmp_path,
                    model="resnet5O")
    said = [line for line in r.stderr.splitlines() if line.startswith("error: unknown model")]
    assert r.returncode != 0 and len(said) == 1, r.stderr[-2000:]
    assert "exitcode: 2" in r.stderr or "exitcode  : 2" in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize("n, world", [(10, 2), (3, 2), (7, 3), (0, 2)])
def test_shares_are_contiguous_disjoint_and_cover_every_chunk(n, world):
    chunks = list(range(100, 100 + n))
    shares = [share(chunks, r, world) for r in range(world)]
    assert sum(shares, []) == chunks
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("pets"), per_class=28, size=48, splits=("train",))


def test_two_ranks_give_the_single_process_cache(folder, tmp_path):
    one = extract_cli("--root", str(folder), "--cache-dir", str(tmp_path / "one"), cwd=tmp_path)
    two = extract_cli("--root", str(folder), "--cache-dir", str(tmp_path / "two"), ranks=2, cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    assert two.stdout.count("(extracted)") == 1, "rank 0 alone reports"
    a = load_features(cache_file(tmp_path / "one", root=str(folder), **REQUEST, split="train"))
    b = load_features(cache_file(tmp_path / "two", root=str(folder), **REQUEST, split="train"))
    assert b.meta["provenance"]["runner"] == "torchrun" and b.meta["provenance"]["processes"] == 2
    assert a.meta["paths"] == b.meta["paths"]
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.meta["index"], b.meta["index"])
    np.testing.assert_array_equal(a.X, b.X)


def rank_pids(marker: str, rank: int) -> list[int]:
    """Processes whose command line mentions `marker` and whose torchrun RANK is `rank`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and f"RANK={rank}".encode() in environ:
            found.append(int(pid))
    return found


def test_a_rank_killed_midway_leaves_its_chunks_and_a_rerun_does_only_the_missing_ones(folder, tmp_path):
    cache = tmp_path / "cache"
    slow = ["--root", str(folder), "--cache-dir", str(cache)]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
    proc = subprocess.Popen([*launcher, "-m", "extract", "--model", "resnet18", *ARGS, *slow], cwd=tmp_path,
                            env={**os.environ, "PYTHONPATH": REPO}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    request = {**REQUEST, "model": "resnet18"}   # seconds per chunk, time to kill a rank midway
    final = cache_file(cache, root=str(folder), **request, split="train")
    deadline = time.time() + 200
    while time.time() < deadline and proc.poll() is None:
        store = ChunkStore.existing(final)
        if store and store.done():
            break
        time.sleep(0.05)
    for pid in rank_pids(str(cache), 1):
        os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=120) != 0, "torchrun reports the dead rank"
    store = ChunkStore.existing(final)
    done = len(store.done())
    assert not final.exists() and 0 < done < store.total

    again = extract_cli(*slow, ranks=2, cwd=tmp_path, model="resnet18")
    assert again.returncode == 0, again.stderr
    assert f"{done} of {store.total} chunks already done" in again.stderr
    whole = extract_cli(*slow[:2], "--cache-dir", str(tmp_path / "whole"), cwd=tmp_path, model="resnet18")
    assert whole.returncode == 0, whole.stderr
    a = load_features(final)
    b = load_features(cache_file(tmp_path / "whole", root=str(folder), **request, split="train"))
    assert a.meta["paths"] == b.meta["paths"]
    np.testing.assert_array_equal(a.X, b.X)
