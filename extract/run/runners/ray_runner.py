"""Ray: a split's missing chunks computed by a pool of Ray actors, saved by the driver.

`python -m extract ... --ray ADDRESS` (or `extract(..., ray=ADDRESS)`) runs the same chunks a
single process would, on a Ray cluster:

    driver: chunks to compute -> ray.data.from_items (one item per chunk: its positions, batches,
            and the file paths, or the uint8 arrays of an in-memory source)
    -> map_batches(_ChunkEmbedder): an actor pool; each actor loads the backbone once, then runs
       extract.compute.engine.run over one chunk per call (the chunk's batches exactly as
       `SplitJob.batches([k], batch_size)` cuts them) and returns its rows in memory
    -> driver: each chunk, as it arrives, goes through a ChunkSink into `job.store.write(k, rows)`

So the chunk files, their rows, resume after any stop, the cache lock, identity and provenance
are those of a local run; only where the forward passes happen changes. Actors read image files
themselves, so the files must be at the same path on every node (NFS and the like); the cache and
its `.partial/` folder stay with the driver. A lost actor is restarted and its chunk retried by
Ray (`max_restarts`, `max_task_retries`); a lost driver leaves its finished chunk files for a rerun.

Ray is imported on this path only; without it the run stops with one line saying how to install it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import pickle
import signal
import socket
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import extract
from extract.compute.allocator import tune_malloc
from extract.compute.engine import Collect, RunStats, cpu_cores, cpu_split, default_workers, resolve_precision, run
from extract.core.errors import UserError
from extract.core.filehash import featprobe_home
from extract.registry.datasets import ImageSource
from extract.registry.models import resolve_weights
from extract.run.job import ChunkSink, SplitJob
from extract.run.plan import Plan
from extract.run.runners.base import Runner, Work
log = logging.getLogger(__name__)

# A lost actor is started again this many times, and its unfinished call retried on it: enough for
# a preempted node or an out-of-memory kill, finite so that an image that crashes the process
# every time ends the run instead of looping.
MAX_RESTARTS = 4
MAX_TASK_RETRIES = 4
# CPU-only clusters: cores per actor (one model copy per actor; within a node, a few actors of a
# few threads each keep the cores busier than one actor with many threads).
CPUS_PER_ACTOR = 4
INSTALL = 'pip install -e ".[ray]"'


def import_ray():
    """The ray module (with ray.data); a one-line UserError when it is not installed."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError(f"--ray needs Ray Data, which is not installed: {INSTALL}") from None
    return ray


def connect(address: str):
    """Ray, joined to the cluster at `address`: 'auto' (the one this machine belongs to),
    'ray://host:port' (Ray Client), 'host:port', or 'local' (a cluster of this machine alone,
    started here and stopped when the process exits). Ray already initialised in this process is
    used as it is, whatever the address."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = (address or "").strip()
    if not address:
        raise UserError("--ray takes an address: auto, ray://host:port or local")
    quiet = dict(include_dashboard=False, logging_level=logging.WARNING, configure_logging=True)
    unreachable = _unreachable(address) if address not in ("auto", "local") else None
    if unreachable:   # Ray itself would wait minutes on a closed port
        raise UserError(f"could not join the Ray cluster at {address}: {unreachable}; check the address "
                        "(`ray status` on the head node), or use --ray local")
    try:
        if address == "local":
            stop_orphaned_local_clusters()
            ray.init(address="local", num_cpus=cpu_cores(), **quiet)
            _remember_local_cluster(ray)
        else:
            # the cluster runs this package as the driver has it (its dependencies must be installed there)
            ray.init(address=address, runtime_env={"py_modules": [str(Path(extract.__file__).resolve().parent)]},
                     **({} if address.startswith("ray://") else quiet))
    except (ConnectionError, ValueError) as e:   # nothing there; a malformed address
        reason = (str(e).strip().splitlines() or ["no answer"])[0].split(". ")[0].rstrip(".")
        raise UserError(f"could not join the Ray cluster at {address}: {reason}; start one with `ray start "
                        "--head`, or use --ray local") from None
    return ray


# A local cluster's processes (gcs_server, raylet, their workers) outlive a driver killed with -9.
# Ray has no option for that, so featprobe records each local cluster it starts and, at the next
# `--ray local`, stops the processes of those whose driver is gone (read from /proc: Linux only).
_LOCAL = "ray-local"


def _remember_local_cluster(ray) -> None:
    """Record the local cluster just started: its session folder and the processes it runs now (some,
    such as its agents, rename themselves and name no session folder)."""
    record = featprobe_home() / _LOCAL / f"{os.getpid()}.json"
    try:
        session = ray._private.worker._global_node.get_session_dir_path()
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"driver": _started(os.getpid()), "session": session,
                                      "processes": [_started(pid) for pid in _descendants(os.getpid())]}))
    except (OSError, AttributeError):   # best effort: only orphan clean-up depends on it
        return
    atexit.register(record.unlink, missing_ok=True)


def stop_orphaned_local_clusters() -> list[int]:
    """Stop the processes of local clusters featprobe started whose driver no longer runs; their pids."""
    stopped = []
    for record in sorted((featprobe_home() / _LOCAL).glob("*.json")):
        try:
            info = json.loads(record.read_text())
        except (OSError, ValueError):
            record.unlink(missing_ok=True)
            continue
        if _started(info["driver"][0]) == info["driver"]:
            continue   # its driver still runs
        leftovers = {pid for pid, start in info["processes"] if _started(pid) == [pid, start]}
        for pid in leftovers | set(_processes_mentioning(info["session"])):
            try:
                os.kill(pid, signal.SIGKILL)
                stopped.append(pid)
            except OSError:
                pass
        record.unlink(missing_ok=True)
    if stopped:
        log.info(f"stopped {len(stopped)} process(es) of a local Ray cluster left by a killed run")
    return stopped


def _stat(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: state, ppid, ... ([] when there is no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
    except (OSError, IndexError):
        return []


def _started(pid: int) -> list[int] | None:
    """[pid, start time in clock ticks] of a running process (a pid reused later has another start)."""
    fields = _stat(pid)
    return [pid, int(fields[19])] if fields and fields[0] != "Z" else None


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        fields = _stat(int(proc.name))
        if fields:
            children.setdefault(int(fields[1]), []).append(int(proc.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains `text`."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(proc.name))
    return found


def _unreachable(address: str) -> str | None:
    """Why nothing answers at an address's host:port, or None when something does (or it has no port)."""
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        return None
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5):
            return None
    except OSError as e:
        return e.strerror or str(e) or type(e).__name__


def actor_shape(ray, chunks: int, actors: int | None = None, use_gpus: bool = True) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for `chunks` chunks on the cluster as it is now.

    With GPUs (and `use_gpus`): one actor per GPU, each with its share of its node's CPUs (for
    decoding). Without: actors of CPUS_PER_ACTOR cores (fewer on small nodes: one actor of 2 on a
    2-core machine), as many as the cluster holds. `actors` asks for a number instead; never more
    than there are chunks.
    """
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    gpu_nodes = [r for r in nodes if r.get("GPU", 0) >= 1] if use_gpus else []
    if gpu_nodes:
        gpus = sum(int(r["GPU"]) for r in gpu_nodes)
        cpus = max(1, min(int(r.get("CPU", 0) // int(r["GPU"])) for r in gpu_nodes))
        n, per_gpu = (actors or gpus), 1.0
        if actors and actors > gpus:
            n = gpus   # an actor holds a whole GPU: more would wait for ever
        return max(1, min(n, chunks)), float(cpus), per_gpu
    cpu_nodes = [int(r.get("CPU", 0)) for r in nodes if r.get("CPU", 0) >= 1] or [1]
    total = sum(cpu_nodes)
    if actors:
        cpus = max(1, min(max(cpu_nodes), total // actors))
        n = min(actors, sum(c // cpus for c in cpu_nodes))
    else:
        cpus = min(min(cpu_nodes), CPUS_PER_ACTOR)
        n = sum(c // cpus for c in cpu_nodes)
    return max(1, min(n, chunks)), float(cpus), 0.0


def _task(job: SplitJob, k: int, batch_size: int) -> bytes:
    """What an actor needs to compute chunk `k`: its positions, its batches as local row numbers,
    and its images (absolute file paths, or the uint8 array rows)."""
    positions = job.todo(k)
    local = {int(p): i for i, p in enumerate(positions)}
    batches = [[local[p] for p in b] for b in job.batches([k], batch_size)]
    source = job.source
    task = {"chunk": int(k), "positions": positions.astype(np.int64), "batches": batches}
    if source.paths is not None:
        task["paths"] = [os.path.abspath(source.paths[p]) for p in positions]
    else:
        task["arrays"] = np.ascontiguousarray(source.arrays[positions])
    return pickle.dumps(task, protocol=pickle.HIGHEST_PROTOCOL)


class _ChunkEmbedder:
    """The Ray Data actor: loads the backbone once, then embeds one chunk per call."""

    def __init__(self, spec: dict):
        self.spec = spec
        identity, request = spec["identity"], spec["request"]
        gpu = spec["gpus"] > 0 and torch.cuda.is_available()
        device = torch.device("cuda") if gpu else torch.device("cpu")
        cores = max(1, int(spec["cpus"]))
        if gpu:   # decode workers and compute threads from the actor's cores, as a local run on them
            self.workers, self.threads = default_workers(device, cores), None
        else:
            tune_malloc()
            self.workers, self.threads = cpu_split(cores)
        weights = resolve_weights(request.model, request.weights)
        plan = Plan(request, identity, None, weights, device, resolve_precision(identity.precision, device),
                    spec["batch_size"])
        backbone = plan.load_backbone(identity.taps)
        if backbone.weights_sha256 != identity.weights_sha256:
            raise UserError(f"the weights {request.weights} on this node are not the driver's (sha256 "
                            f"{backbone.weights_sha256} here, {identity.weights_sha256} there): give every node "
                            "the same file")
        self.embedder = plan.embedder(backbone, identity, Path(spec["cache_path"]), self.threads)
        self.device = str(device)
        self.provenance = self.embedder.provenance()

    def __call__(self, batch: dict) -> dict:
        out = [pickle.dumps(self.chunk(pickle.loads(task)), protocol=pickle.HIGHEST_PROTOCOL)
               for task in batch["task"]]
        return {"chunk": np.asarray(batch["chunk"], np.int64), "result": np.array(out, dtype=object)}

    def chunk(self, task: dict) -> dict:
        positions = task["positions"]
        m = len(positions)
        labels = np.zeros(m, np.int64)   # the driver's sink puts the labels in
        source = ImageSource("chunk", [], labels, paths=task["paths"]) if "paths" in task else \
            ImageSource("chunk", [], labels, arrays=task["arrays"])
        sink = Collect()
        try:
            stats = run(self.embedder, source, sink, task["batches"], workers=self.workers if "paths" in task else 0,
                        on_error=self.spec["request"].on_error, progress=False, decoder=self.spec["decoder"],
                        threads=self.threads)
        except UserError as e:   # --on-error stop: the driver says it (after saving what came before)
            return {"chunk": task["chunk"], "error": str(e)}
        taps = self.spec["dims"]
        features = {t: np.concatenate([f[t] for f in sink.rows]) if sink.rows
                    else np.zeros((0, d), np.float32) for t, d in taps.items()}
        kept = positions[np.concatenate(sink.index)] if sink.index else np.zeros(0, np.int64)
        skipped = [(int(positions[i]), path, reason) for i, path, reason in sink.skipped]
        return {"chunk": task["chunk"], "features": features, "kept": kept, "n": sink.n, "skipped": skipped,
                "seconds": stats.seconds, "device": self.device, "workers": self.workers, "threads": self.threads,
                "provenance": self.provenance}


class RayRunner(Runner):
    """`--ray ADDRESS`: the chunks on a pool of Ray actors; this process (the driver) saves them."""

    name = "ray"
    local = False

    def __init__(self, address: str | None):
        if not address:
            raise UserError("the ray runner needs an address: --ray auto, ray://host:port or local")
        self.address = address

    def compute(self, job: SplitJob, work: Work, chunks: list[int]) -> RunStats:
        return compute_on_ray(job, work, chunks, self.address)


def compute_on_ray(job: SplitJob, work: Work, missing: list[int], address: str) -> RunStats:
    """Compute chunks `missing` of `job` on the Ray cluster at `address`, saving each on this
    machine (the driver) as it arrives. --workers: how many actors (None: from the cluster's
    CPUs and GPUs, see `actor_shape`). Returns what was computed, as a local run does."""
    stats = RunStats()
    if not missing:
        return stats
    ray = connect(address)
    from ray.data import ActorPoolStrategy

    p, identity, request = work.plan, work.identity, work.plan.request
    batch_size, progress, desc = p.batch_size, request.progress, work.desc
    # GPUs where the cluster has them, unless this machine has one and --device asked for the CPU
    n_actors, cpus, gpus = actor_shape(ray, len(missing), request.workers,
                                       use_gpus=not (p.device.type == "cpu" and torch.cuda.is_available()))
    weights = str(p.weights.file.resolve()) if p.weights.file is not None and p.weights.weight is None \
        else p.weights.argument
    spec = {"identity": identity, "request": request.replace(model=p.weights.spec.name, weights=weights),
            "batch_size": batch_size, "dims": dict(job.dims), "cpus": cpus, "gpus": gpus,
            "decoder": identity.decoder or "auto", "cache_path": str(job.store.path.resolve())}
    images = sum(len(job.todo(k)) for k in missing)
    with _quiet_ray_data():
        items = [{"chunk": k, "task": _task(job, k, batch_size)} for k in missing]
        try:
            ds = ray.data.from_items(items, override_num_blocks=len(items))
        except TypeError:   # Ray before 2.10
            ds = ray.data.from_items(items, parallelism=len(items))
        del items
        options = dict(fn_constructor_kwargs={"spec": spec}, batch_size=1, batch_format="numpy",
                       compute=ActorPoolStrategy(size=n_actors), num_cpus=cpus, **({"num_gpus": gpus} if gpus else {}))
        try:
            ds = ds.map_batches(_ChunkEmbedder, **options, max_restarts=MAX_RESTARTS,
                                max_task_retries=MAX_TASK_RETRIES)
        except TypeError:   # a Ray without these arguments restarts actors and retries their calls by default
            ds = ds.map_batches(_ChunkEmbedder, **options)
    sink = ChunkSink(job, missing)
    bar = tqdm(total=images, desc=desc + f" ray x{n_actors}", unit="img", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    t0 = time.perf_counter()
    actor = None
    try:
        with _quiet_ray_data():
            rows = iter(ds.iter_rows())
            try:
                for row in rows:
                    result = pickle.loads(row["result"])
                    if "error" in result:
                        raise UserError(result["error"])
                    skipped = result["skipped"]
                    sink.add(result["features"], result["kept"], result["n"], skipped)
                    stats.images += result["n"]
                    stats.skipped += skipped
                    actor = actor or {k: result[k] for k in ("device", "workers", "threads", "provenance")}
                    bar.update(result["n"])
                    bar.set_postfix_str(f"{stats.images / (time.perf_counter() - t0):.1f} img/s", refresh=False)
            finally:
                close = getattr(rows, "close", None)
                if close is not None:
                    close()
    except Exception as e:
        cause = _user_error(e)
        if cause is not None and cause is not e:
            raise UserError(str(cause)) from None
        raise
    finally:
        bar.close()
        stats.seconds = time.perf_counter() - t0
    if sink.written != len(missing):
        raise RuntimeError(f"Ray returned {sink.written} of {len(missing)} chunks")
    # what the actors ran on, in place of the driver's (the cache's provenance is written after this)
    stats.provenance = {**actor["provenance"], "device": actor["device"], "workers": actor["workers"],
                        "torch_threads": actor["threads"],
                        "ray": {"actors": n_actors, "cpus_per_actor": cpus, "gpus_per_actor": gpus,
                                "address": address, "ray_version": ray.__version__}}
    stats.skipped.sort()
    return stats


@contextlib.contextmanager
def _quiet_ray_data():
    """Ray Data without its own progress bars, plan printouts and INFO lines (the driver has one bar),
    and without the deprecation warnings of the arguments that older Rays need."""
    from ray.data import DataContext

    logger = logging.getLogger("ray.data")
    level = logger.level
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(deprecated|ray_remote_args).*")
        ctx = DataContext.get_current()
        saved = {k: getattr(ctx, k) for k in ("enable_progress_bars", "print_on_execution_start") if hasattr(ctx, k)}
        for k in saved:
            setattr(ctx, k, False)
        logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for k, v in saved.items():
                setattr(ctx, k, v)
            logger.setLevel(level)


def _user_error(e: BaseException) -> UserError | None:
    """A UserError raised in an actor, from the exceptions Ray wraps it in."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, UserError):
            return e
        e = getattr(e, "cause", None) or e.__cause__
    return None


__all__ = ["RayRunner", "actor_shape", "compute_on_ray", "connect", "import_ray", "MAX_RESTARTS", "MAX_TASK_RETRIES"]
