"""--ray: chunks computed by Ray actors give the cache a single process gives, and survive a
killed driver (rerun resumes) and a killed actor (Ray restarts it and retries its chunks)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

ray = pytest.importorskip("ray")

from extract.api import extract  # noqa: E402
from extract.run.runners.ray_runner import _started  # noqa: E402
from extract.store.cache import partial_path  # noqa: E402
from extract.core.errors import UserError  # noqa: E402

pytestmark = pytest.mark.slow   # subprocesses, clusters and compilers: minutes on 2 cores

REPO = Path(__file__).resolve().parents[1]
ACTOR_TITLE = "ray::MapWorker(MapBatches(_ChunkEmbedder))"
RUN_TIMEOUT = 300   # seconds for one CLI run, far above the ~20 s one takes on 2 busy cores
SMALL = dict(model="cifar_resnet20", weights="none", precision="fp32", device="cpu", progress=False)
# enough chunks that the run is still busy for seconds after its first chunk file appears
BIG_N, BIG_CHUNK = 1024, 16


@pytest.fixture(scope="module")
def cluster():
    """One local Ray cluster of 2 CPUs for the module (extract reuses Ray already initialised)."""
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def contents(path) -> dict:
    """Every dataset of a cache file, and the attributes that say what its features are."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        for key in ("identity", "fingerprint", "n_rows", "complete", "split"):
            out["@" + key] = f.attrs[key]
    return out


def assert_same_cache(a, b) -> None:
    """Same rows, index, labels, paths, skipped records and identity; features bit for bit, since
    both runs push the same batches through the same network at fp32 on this CPU with as many
    torch threads (the 2 cores here). Elsewhere an actor may get fewer threads than a local run
    (4 cores per actor), and oneDNN's sums may then round differently: there, float32 closeness."""
    x, y = contents(a), contents(b)
    assert sorted(x) == sorted(y)
    assert any(k.startswith("features/") for k in x) and len(x["index"]) == x["@n_rows"]
    same_threads = provenance(a)["torch_threads"] == provenance(b)["torch_threads"]
    for key in x:
        if key.startswith("features/") and not same_threads:
            np.testing.assert_allclose(x[key], y[key], rtol=1e-5, atol=1e-6, err_msg=key)
        elif isinstance(x[key], np.ndarray):
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        else:
            assert x[key] == y[key], key


def provenance(path) -> dict:
    import json

    with h5py.File(path, "r") as f:
        return json.loads(f.attrs["provenance"])


def make_folder(root: Path, per_class: int = 10, broken: bool = True) -> Path:
    """A folder of small JPEGs in three classes, plus one file that is no image."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("ants", "bees", "wasps"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)).save(root / c / f"{i:02d}.jpg")
    if broken:
        (root / "bees" / "05b.jpg").write_bytes(b"not a jpeg at all")
    return root


def cli(*args: str, cache: Path, ray_address: str) -> list[str]:
    return [sys.executable, "-m", "extract", "--model", "cifar_resnet20", "--weights", "none", "--data", "synthetic",
            "--option", f"n={BIG_N}", "--split", "train", "--precision", "fp32", "--chunk-size", str(BIG_CHUNK),
            "--device", "cpu", "--cache-dir", str(cache), "--no-progress", "--ray", ray_address, *args]


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env,
                            start_new_session=True)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        reap(proc)
        out, err = proc.communicate()
        pytest.fail(f"the run took over {RUN_TIMEOUT} s:\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{out}\n{err[-3000:]}"
    return out, err


def reap(proc: subprocess.Popen) -> None:
    """Kill what the run started and left (its own local Ray cluster): its process group and
    session, which it leads."""
    for pid in [proc.pid] + [p for p in _pids() if _sid(p) == proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    proc.wait(timeout=30)


def chunk_files(cache: Path) -> list[Path]:
    return sorted(cache.glob("**/*.h5.partial/chunk-*.h5"))


def wait_for_chunks(cache: Path, proc: subprocess.Popen, deadline: float) -> int:
    """Block until the run has saved its first chunk file; the number of them then."""
    while time.monotonic() < deadline:
        found = len(chunk_files(cache))
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"the run ended before saving a chunk:\n{proc.stdout.read()}\n{proc.stderr.read()[-3000:]}")
        time.sleep(0.01)
    reap(proc)
    pytest.fail("no chunk file appeared in time")


def _pids() -> list[int]:
    return [int(d) for d in os.listdir("/proc") if d.isdigit()]


def _sid(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


def _title(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _descends_from(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return False
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return False


def actor_pids() -> list[int]:
    """The extraction actors of this module's cluster (children of the raylet this process started)."""
    return [p for p in _pids() if _title(p).startswith(ACTOR_TITLE) and _descends_from(p, os.getpid())]


def baseline(tmp_path_factory, **kwargs) -> Path:
    """The cache a single process writes for the same request."""
    cache = tmp_path_factory.mktemp("local")
    return extract(**SMALL, cache_dir=cache, **kwargs)[kwargs.get("splits", ["train"])[0]].path


# ----------------------------------------------------------------------------- the same cache


def test_arrays_equal_single_process(cluster, tmp_path, tmp_path_factory):
    request = dict(data="synthetic", dataset_options={"n": 64}, chunk_rows=8, batch_size=4, splits=["train"])
    got = extract(**SMALL, cache_dir=tmp_path, ray="auto", **request)["train"]
    assert got.status == "extracted" and got.images == 64
    local = baseline(tmp_path_factory, **request)
    assert_same_cache(got.path, local)
    prov = provenance(got.path)
    assert prov["runner"] == "ray" and prov["ray"]["actors"] >= 1 and prov["device"] == "cpu"
    assert provenance(local)["runner"] == "process"
    assert not partial_path(got.path).exists()


def test_image_folder_equal_single_process(cluster, tmp_path, tmp_path_factory):
    folder = make_folder(tmp_path / "images")
    request = dict(data="imagefolder", root=str(folder), chunk_rows=8, batch_size=3, splits=["train"])
    got = extract(**SMALL, cache_dir=tmp_path / "cache", ray="auto", **request)["train"]
    assert got.images == 31 and got.skipped == 1
    local = baseline(tmp_path_factory, **request)
    assert_same_cache(got.path, local)
    x = contents(got.path)
    assert len(x["index"]) == 30 and x["skipped/path"][0].decode().endswith("05b.jpg")
    assert x["paths"][0].decode() == str(folder / "ants" / "00.jpg")


def test_on_error_stop_is_one_line(cluster, tmp_path):
    folder = make_folder(tmp_path / "images")
    with pytest.raises(UserError, match=r"cannot read .*05b\.jpg"):
        extract(**SMALL, data="imagefolder", root=str(folder), chunk_rows=8, cache_dir=tmp_path / "cache",
                ray="auto", on_error="stop")


def test_missing_ray_is_one_line(monkeypatch):
    from extract.run.runners import ray_runner

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(UserError, match=re.escape('pip install -e ".[ray]"')):
        ray_runner.import_ray()


def test_closed_port_is_one_line_not_a_wait():
    from extract.run.runners.ray_runner import _unreachable

    assert "refused" in _unreachable("127.0.0.1:1").lower()
    assert "refused" in _unreachable("ray://127.0.0.1:1").lower()
    assert _unreachable("auto") is None


def test_actor_shape():
    from extract.run.runners.ray_runner import actor_shape

    class Cluster:
        def __init__(self, *nodes):
            self._nodes = [{"Alive": True, "Resources": r} for r in nodes]

        def nodes(self):
            return self._nodes

    assert actor_shape(Cluster({"CPU": 2.0}), chunks=8) == (1, 2.0, 0.0)
    assert actor_shape(Cluster({"CPU": 2.0}), chunks=8, actors=2) == (2, 1.0, 0.0)
    assert actor_shape(Cluster({"CPU": 16.0}, {"CPU": 16.0}), chunks=100) == (8, 4.0, 0.0)
    assert actor_shape(Cluster({"CPU": 16.0}, {"CPU": 16.0}), chunks=3) == (3, 4.0, 0.0)
    assert actor_shape(Cluster({"CPU": 4.0}, {"CPU": 32.0, "GPU": 4.0}), chunks=100) == (4, 8.0, 1.0)
    assert actor_shape(Cluster({"CPU": 32.0, "GPU": 4.0}), chunks=100, actors=9) == (4, 8.0, 1.0)


# ----------------------------------------------------------------------------- failures


def test_killed_driver_resumes(tmp_path, tmp_path_factory):
    """kill -9 of the driver once chunks are saved; the rerun computes only the rest."""
    cache = tmp_path / "cache"
    proc = start(cli(cache=cache, ray_address="local"))
    try:
        saved = wait_for_chunks(cache, proc, time.monotonic() + RUN_TIMEOUT)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    except BaseException:
        reap(proc)
        raise
    try:
        _rerun_after_a_killed_driver(proc, cache, saved, tmp_path_factory)
    finally:
        reap(proc)   # whatever of its cluster a failed check left


def _rerun_after_a_killed_driver(proc, cache, saved, tmp_path_factory):
    total = BIG_N // BIG_CHUNK
    left = len(chunk_files(cache))
    assert saved <= left < total, "the driver should have died midway"
    records = list((Path(os.environ["FEATPROBE_HOME"]) / "ray-local").glob(f"{proc.pid}.json"))
    assert len(records) == 1, "the local cluster the driver started is recorded"
    recorded = json.loads(records[0].read_text())["processes"]
    orphans = [pid for pid, start in recorded if _started(pid) == [pid, start]]
    assert orphans, "a driver killed with -9 leaves processes of its local cluster running"
    assert not list(cache.glob("**/train.fp32.h5")), "no cache file before the rerun"

    rerun = start(cli(cache=cache, ray_address="local"))
    try:
        out, err = finish(rerun)
    finally:
        reap(rerun)
    assert "(resumed)" in out, out
    assert not [pid for pid in orphans if _started(pid)], "the rerun stops the killed driver's cluster"
    assert "stopped" in err and "left by a killed run" in err, err
    done = int(re.search(r"Extracted ([\d,]+) images", out).group(1).replace(",", ""))
    assert done == BIG_N - left * BIG_CHUNK, out
    path = Path(re.search(r"train: (\S+) \(resumed\)", out).group(1))
    path = path if path.is_absolute() else REPO / path
    assert_same_cache(path, baseline(tmp_path_factory, data="synthetic", dataset_options={"n": BIG_N},
                                     chunk_rows=BIG_CHUNK, splits=["train"]))
    assert not chunk_files(cache)


def test_killed_actor_is_retried(cluster, tmp_path, tmp_path_factory):
    """SIGKILL of the actor once the first chunk is saved: Ray restarts it and retries its chunks;
    the run (a driver joining this module's cluster by its address) ends complete and equal."""
    cache = tmp_path / "cache"
    proc = start(cli(cache=cache, ray_address=cluster))
    try:
        deadline = time.monotonic() + RUN_TIMEOUT
        saved = wait_for_chunks(cache, proc, deadline)
        victims = actor_pids()
        while not victims and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
            victims = actor_pids()
        assert victims, "no extraction actor found"
        os.kill(victims[0], signal.SIGKILL)
        at_kill = len(chunk_files(cache))
        replaced = []   # Ray starts the actor again (a new process) for the chunks left
        while not replaced and time.monotonic() < deadline and proc.poll() is None:
            replaced = [p for p in actor_pids() if p != victims[0]]
            time.sleep(0.01)
        out, err = finish(proc)
    finally:
        reap(proc)
    assert saved <= at_kill < BIG_N // BIG_CHUNK, "the actor should have died midway"
    assert not _title(victims[0]).startswith(ACTOR_TITLE), "the killed actor is gone (or a zombie)"
    assert "(extracted)" in out and f"Extracted {BIG_N:,} images" in out, out
    assert replaced, "no actor replaced the killed one"
    path = Path(re.search(r"train: (\S+) \(extracted\)", out).group(1))
    path = path if path.is_absolute() else REPO / path
    assert_same_cache(path, baseline(tmp_path_factory, data="synthetic", dataset_options={"n": BIG_N},
                                     chunk_rows=BIG_CHUNK, splits=["train"]))
    assert not chunk_files(cache)
