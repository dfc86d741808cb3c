"""`extract(...)`: dataset + backbone -> one complete cache file per split, reusing what matches.

`plan(...)` turns a request into a FeatureIdentity once; `extract` passes it along and asks
`identity.verdict` whether each split's file is a hit.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from . import cache
from .allocator import malloc_tuned, tune_malloc
from .assemble import assemble
from .chunks import DEFAULT_CHUNK_ROWS, ChunkStore
from .datasets import Dataset, load_dataset
from .distributed import Ranks, ranks_from_env
from .engine import (Embedder, RunStats, check_image_size, compute_threads, cpu_cores, cpu_has_bf16, default_workers,
                     effective_preprocess, precision_name, resolve_device, resolve_precision)
from .incremental import Reuse, can_reuse, stamps_of
from .incremental import plan as incremental_plan
from .job import SplitJob, compute, share
from .errors import UserError
from .identity import NORMALIZE_CHOICES, PENULTIMATE, FeatureIdentity, describe_differences, verdict
from .models import ResolvedWeights, load_backbone, resolve_weights
from .pipeline import resolve_decoder

DTYPES = ("float32", "float16")
ENGINE_CHOICES = ("torch", "openvino", "auto")
ON_ERROR = ("skip", "stop")
DEFAULT_BATCH, CUDA_BATCH = 64, 256   # images per forward pass; a GPU needs more to stay busy
log = logging.getLogger(__name__)


@dataclass
class SplitResult:
    """Where one split's features are and how they got there."""

    split: str
    path: Path
    status: str  # "hit", "extracted", "resumed" or "updated" (an image folder that changed)
    images: int = 0
    seconds: float = 0.0
    skipped: int = 0
    reuse: str = ""  # for "updated": what was reused, new, removed and changed

    def __fspath__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class Plan:
    """A request resolved once: its identity and what is needed to compute it."""

    identity: FeatureIdentity
    dataset: Dataset
    weights: ResolvedWeights
    device: torch.device
    autocast: torch.dtype | None
    dataset_stats: dict | None = None   # --normalize dataset: mean/std of the train split and where they came from


def plan(model: str = "efficientnet_lite0", data: str = "digits", *, weights: str | None = "default",
         layers: Sequence[str] | None = None, root: str | None = None, download: bool = False,
         dataset_options: dict | None = None, device: str = "auto", precision: str = "auto",
         dtype: str = "float32", image_size: int | None = None, normalize: str = "weights",
         cache_dir: str | os.PathLike = "cache", batch_size: int = 64, workers: int | None = None,
         progress: bool = True, engine: str = "torch", decoder: str = "auto") -> Plan:
    """The identity of the features a request asks for (no network is run).

    image_size N: the network sees N x N inputs (None: the weights' own size; N equal to it is the
    same request). normalize "dataset": mean/std of the train split's resized images instead of
    the weights' own, read from `cache_dir` when remembered there, else computed in one pass
    (`extract.normalize`; batch_size, workers and progress apply to that pass). engine: "torch",
    "openvino" (CPU only) or "auto" (see `resolve_engine`); the identity records the one that runs.
    decoder: image files decoded by "tensor" (JPEGs by torchvision), "pil" or "auto" (tensor where
    available); the identity records the one used (None for in-memory arrays).
    """
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use {' or '.join(DTYPES)}")
    image_size = check_image_size(image_size)
    if normalize not in NORMALIZE_CHOICES:
        raise UserError(f"unknown --normalize {normalize!r}: use {' or '.join(NORMALIZE_CHOICES)}")
    resolved = resolve_weights(model, weights)   # published weights download into torch.hub's cache when missing
    dataset = load_dataset(data, root=root, download=download, **(dataset_options or {}))
    engine = resolve_engine(engine, device, precision)
    dev = torch.device("cpu") if engine == "openvino" else resolve_device(device)
    autocast = resolve_precision(precision, dev)
    if engine == "openvino":
        from .openvino_engine import check_precision

        check_precision(autocast)
    in_memory = any(s.arrays is not None for s in dataset.splits.values())
    file_decoder = resolve_decoder(decoder)
    if image_size == effective_preprocess(resolved.preprocess, in_memory).crop:
        image_size = None   # the weights' own size: the default request, one cache
    preprocess = effective_preprocess(resolved.preprocess, in_memory, image_size)
    stats = None
    if normalize == "dataset":
        from .normalize import STATS_SPLIT, dataset_stats, with_stats

        if STATS_SPLIT not in dataset.splits:
            raise UserError(f"--normalize dataset needs a {STATS_SPLIT} split; {data} has "
                            f"{', '.join(dataset.splits)}")
        source = dataset.splits[STATS_SPLIT]
        stats = dataset_stats(source, preprocess, cache_dir=cache_dir, data_label=dataset.ref.label, device=dev,
                              batch_size=batch_size, progress=progress,
                              workers=0 if source.arrays is not None else
                              (default_workers(dev) if workers is None else workers))
        preprocess = with_stats(preprocess, stats)
    identity = FeatureIdentity(
        data=dataset.ref, model=resolved.name, weights_sha256=resolved.sha256,
        preprocess=preprocess, precision=precision_name(autocast),
        precision_requested=precision, dtype=dtype, taps=tuple(dict.fromkeys(layers or [PENULTIMATE])),
        image_size=image_size, normalize=normalize, engine=engine, decoder=None if in_memory else file_decoder)
    return Plan(identity, dataset, resolved, dev, autocast, stats)


def resolve_engine(engine: str, device: str = "auto", precision: str = "auto") -> str:
    """'torch' or 'openvino' for a request (the identity records it; never 'auto').

    openvino runs on the CPU only (another --device is a one-line error) and needs the package
    (missing: one line saying how to install it). auto: openvino where the network would run on the
    CPU, OpenVINO is installed and can compute the precision asked for (fp32, or bf16 on a CPU with
    native bf16); torch otherwise (a GPU, fp16, bf16 emulated on a CPU without it).
    """
    if engine not in ENGINE_CHOICES:
        raise UserError(f"unknown engine {engine!r}: use {', '.join(ENGINE_CHOICES)}")
    if engine == "torch":
        return engine
    try:
        asked = None if device == "auto" else torch.device(device).type
    except RuntimeError:
        resolve_device(device)   # its one-line message for an unknown device
        raise
    from . import openvino_engine

    if engine == "openvino":
        if asked not in (None, "cpu"):
            raise UserError(f"--engine openvino runs on the CPU only: drop --device {device}, "
                            "or use --engine torch")
        openvino_engine.import_openvino()   # one line when it is not installed
        return engine
    on_cpu = (asked or resolve_device("auto").type) == "cpu"
    precision_ok = precision in ("auto", "fp32") or (precision == "bf16" and cpu_has_bf16())
    return "openvino" if on_cpu and precision_ok and openvino_engine.available() else "torch"


def _conflict_message(path: Path, conflicts, stored: FeatureIdentity | None, wanted: FeatureIdentity) -> str:
    text = f"{path} holds other features: {describe_differences(list(conflicts), stored, wanted)}"
    if stored is not None and "precision" in conflicts and wanted.precision_requested == "auto":
        text += (f"; --precision auto means {wanted.precision} here: pass --precision {wanted.precision} to "
                 f"extract {wanted.precision} features beside them")
    return text + "; pass --overwrite to replace them, or --cache-dir DIR to keep both"


def extract(model: str = "efficientnet_lite0", data: str = "digits", *, weights: str | None = "default",
            layers: Sequence[str] | None = None, root: str | None = None, download: bool = False,
            splits: Sequence[str] | None = None, cache_dir: str | os.PathLike = "cache",
            batch_size: int | None = None, workers: int | None = None, device: str = "auto",
            precision: str = "auto", dtype: str = "float32", on_error: str = "skip", overwrite: bool = False,
            progress: bool = True,
            dataset_options: dict | None = None, allow_missing_weights: bool = False,
            image_size: int | None = None, normalize: str = "weights",
            engine: str = "torch", decoder: str = "auto", chunk_rows: int = DEFAULT_CHUNK_ROWS,
            ray: str | None = None, compile: bool = False) -> dict[str, SplitResult]:
    """Extract (or reuse) features for every split of `data` with backbone `model`; returns {split: SplitResult}.

    image_size: input side in pixels (None: the weights' own); normalize: "weights" (their own
    mean/std) or "dataset" (the train split's, remembered under `cache_dir`). engine: "torch",
    "openvino" (CPU only; its converted model is kept under `cache_dir`) or "auto"; decoder: "auto",
    "tensor" or "pil" for image files. See `plan`. On the CPU glibc's malloc is tuned for the
    process first (`extract.allocator`; FEATPROBE_MALLOC_TUNING=0 turns that off).

    Work is done in chunks of `chunk_rows` images (extract.chunks): an interrupted run resumes at
    the missing chunks, and an image folder that changed since its cache was made reuses the rows
    of unchanged files (extract.incremental). Under torchrun the ranks share the chunks
    (extract.distributed); `ray` (an address, or "local") runs them on a Ray cluster (extract.ray_runner).
    compile=True runs the torch engine's backbone through torch.compile (its time is in the provenance).
    """
    if on_error not in ON_ERROR:
        raise UserError(f"unknown --on-error {on_error!r}: use {' or '.join(ON_ERROR)}")
    if (batch_size is not None and batch_size < 1) or chunk_rows < 1:
        raise UserError("batch size and chunk size must be at least 1")
    ranks = ranks_from_env(device)
    if ranks.world > 1 and ray:
        raise UserError("--ray and torchrun are two ways to share the work: use one of them")
    device = ranks.device(device)
    if engine == "openvino" or resolve_device(device).type == "cpu":
        tune_malloc()
    p = plan(model, data, weights=weights, layers=layers, root=root, download=download,
             dataset_options=dataset_options, device=device, precision=precision, dtype=dtype,
             image_size=image_size, normalize=normalize, cache_dir=cache_dir,
             batch_size=batch_size or DEFAULT_BATCH, workers=workers, progress=progress and ranks.leader,
             engine=engine, decoder=decoder)
    if compile and (p.identity.engine != "torch" or ray):
        raise UserError("--compile applies to the torch engine in this process: drop it with --engine openvino "
                        "or --ray")
    batch_size = batch_size or (CUDA_BATCH if p.device.type == "cuda" else DEFAULT_BATCH)
    dataset = p.dataset
    wanted = list(splits or dataset.splits)
    unknown = [s for s in wanted if s not in dataset.splits]
    if unknown:
        raise UserError(f"dataset {data} has no split {unknown[0]!r}; it has {', '.join(dataset.splits)}")
    run_options = dict(batch_size=batch_size, workers=workers, on_error=on_error, progress=progress,
                       allow_missing=allow_missing_weights, chunk_rows=chunk_rows, ray=ray, compile=compile)
    results: dict[str, SplitResult] = {}
    backbone = None
    for split in wanted:
        source = dataset.splits[split]
        if len(source) == 0:
            raise UserError(f"split {split} of {data} has no images")
        path = p.identity.cache_path(cache_dir, split)
        stamps = stamps_of(source.paths) if source.paths is not None else None
        fingerprint = source.fingerprint(stamps)
        identity = p.identity
        lock = cache.lock_for(path) if ranks.leader else None
        if lock is not None:
            cache.acquire(lock, path, log.info)
        try:
            ranks.barrier()
            header = cache.read_header(path)
            reuse = Reuse.none(len(source))
            if header and header["damaged"]:
                if ranks.leader:
                    log.warning(f"warning: {path} is damaged ({header['damaged']}); extracting it again")
            elif header and not overwrite:
                stored = header["identity"]
                v = verdict(stored, header.get("fingerprint"), identity, fingerprint)
                if v.hit:
                    results[split] = SplitResult(split, path, "hit")
                    continue
                grown = v.conflicts == ("fingerprint",) and source.paths is not None and can_reuse(path)
                if v.conflicts and not grown:
                    raise UserError(_conflict_message(path, v.conflicts, stored, identity))
                identity = identity.with_taps(stored.taps + tuple(t for t in identity.taps if t not in stored.taps))
                if grown and all(t in stored.taps for t in p.identity.taps):
                    reuse = incremental_plan(path, source.paths, stamps)
            if backbone is None or set(backbone.layers) != set(identity.taps):
                backbone = _load(p.weights, identity.taps, allow_missing_weights)
                if identity.image_size is not None and identity.image_size < p.weights.preprocess.crop:
                    _check_runs_at(backbone, identity)
            results[split] = _extract_split(backbone, p, identity, source, path, stamps, fingerprint, reuse,
                                            ranks, **run_options)
        finally:
            if lock is not None:
                lock.release()
    return results


def _load(resolved: ResolvedWeights, taps, allow_missing: bool):
    """The backbone; random init ('none') is seeded so every run of one identity sees the same network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_backbone(resolved.spec.name, weights=resolved.argument, layers=list(taps), allow_missing=allow_missing)


def _check_runs_at(backbone, identity: FeatureIdentity) -> None:
    """One zero image at a smaller size than the weights' own, on the CPU (cheaper than one image at the
    usual size): a network that shrinks it to nothing is a one-line UserError, not a traceback mid-run."""
    n = identity.preprocess.crop
    try:
        with torch.inference_mode():
            backbone.eval()(torch.zeros(1, 3, n, n))
    except RuntimeError as e:
        reason = (str(e).strip().splitlines() or ["error"])[0]
        raise UserError(f"{identity.model} cannot run on {n}x{n} inputs ({reason}); use a larger --image-size") \
            from None


def _normalization(p: Plan, identity: FeatureIdentity) -> dict:
    """The weights' own mean/std and, for --normalize dataset, the dataset's: side by side for reports."""
    own = p.weights.preprocess
    out = {"used": identity.normalize, "weights": {"mean": list(own.mean), "std": list(own.std)}, "dataset": None}
    if p.dataset_stats is not None:
        out["dataset"] = {k: p.dataset_stats.get(k) for k in ("mean", "std", "split", "n_images", "skipped",
                                                              "fingerprint", "spatial", "file")}
    return out


def _extract_split(backbone, p: Plan, identity: FeatureIdentity, source, path: Path, stamps, fingerprint: str,
                   reuse: Reuse, ranks: Ranks, *, batch_size, workers, on_error, progress, allow_missing,
                   chunk_rows, ray, compile) -> SplitResult:
    asked_workers = workers   # --ray: how many actors (None: from the cluster)
    if ranks.world > 1 and p.device.type == "cpu":
        workers = 0 if workers is None else workers
        threads = max(1, cpu_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", ranks.world)))
    else:
        workers = default_workers(p.device) if workers is None else workers
        threads = compute_threads(workers) if p.device.type == "cpu" else None
    embedder = None if ray else _embedder(backbone, p, identity, path, threads, compile)
    provenance = {**backbone.provenance(), "model": identity.model, "weights": backbone.weights,
                  "preprocess": identity.preprocess.as_dict(), "weights_preprocess": p.weights.preprocess.as_dict(),
                  "image_size": identity.image_size, "normalization": _normalization(p, identity),
                  "dataset": p.dataset.name,
                  "dataset_identity": p.dataset.identity, "split": source.name, "classes": p.dataset.classes,
                  "n_images": len(source), "dtype": identity.dtype, "precision": identity.precision,
                  "precision_requested": identity.precision_requested, "device": str(p.device),
                  "layers": backbone.layers, "dims": backbone.dims, "allow_missing_weights": allow_missing,
                  "engine": identity.engine,
                  **(embedder.provenance() if embedder is not None else {}),
                  "decoder": identity.decoder, "malloc_tuning": malloc_tuned(), "workers": workers,
                  "torch_threads": threads, "chunk_rows": chunk_rows,
                  "runner": "ray" if ray else ("torchrun" if ranks.world > 1 else "process"),
                  "processes": ranks.world}
    manifest = {"identity": identity.to_dict(), "split": source.name, "fingerprint": fingerprint,
                "dims": backbone.dims, "chunk_rows": chunk_rows, "n_images": len(source),
                "base": reuse.base_fingerprint}
    if ranks.leader:
        ChunkStore.open(path, manifest, log.info)
    ranks.barrier()
    job = SplitJob(identity, source, stamps, fingerprint, ChunkStore(path, manifest), reuse, backbone.dims,
                   provenance)
    missing = ranks.broadcast(job.missing())
    store = job.store
    done_before = len(store.done())
    if ranks.leader:
        if reuse.base is not None:
            log.info(f"{source.name}: {reuse.describe()}")
        if done_before:
            log.info(f"resuming {path.name}: {done_before} of {store.total} chunks already done")
    desc = f"{identity.data.label}/{source.name}" + (f" rank {ranks.rank}" if ranks.world > 1 else "")
    try:
        if ray:
            from .ray_runner import compute_on_ray

            stats = compute_on_ray(job, p, missing, address=ray, batch_size=batch_size, workers=asked_workers,
                                   on_error=on_error, progress=progress, desc=desc,
                                   allow_missing=allow_missing)
        else:
            stats = compute(job, embedder, share(missing, ranks.rank, ranks.world), batch_size=batch_size,
                            workers=workers, on_error=on_error, progress=progress, desc=desc,
                            decoder=identity.decoder or "auto", threads=threads)
        if ranks.world > 1:
            every = ranks.gather(stats)
            stats = RunStats(sum(s.images for s in every), max(s.seconds for s in every),
                             [x for s in every for x in s.skipped])
        if embedder is not None:
            provenance.update(embedder.provenance())   # what running taught (compile time)
        if ranks.leader:
            assemble(store, reuse, identity, source, stamps, fingerprint, provenance, backbone.dims)
        ranks.barrier()
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{len(store.done())} of {store.total} chunks of {source.name} saved in "
                                f"{store.dir}; rerun the same command to resume") from None
    except OSError as e:
        raise UserError(f"could not write in {store.dir}: {e.strerror or e}; the {len(store.done())} finished "
                        "chunk(s) are kept: free space and rerun the same command to resume") from None
    if stats.skipped:
        shown = "; ".join(f"{Path(p).name}: {r}" for _, p, r in stats.skipped[:3])
        log.warning(f"skipped {len(stats.skipped)} unreadable image(s) in {source.name} ({shown}"
                    + (" ..." if len(stats.skipped) > 3 else "") + "); recorded in the cache under skipped/")
    status = "updated" if reuse.base is not None else ("resumed" if done_before else "extracted")
    return SplitResult(source.name, path, status, stats.images, stats.seconds, len(stats.skipped),
                       reuse.describe() if reuse.base is not None else "")


def _embedder(backbone, p: Plan, identity: FeatureIdentity, path: Path, threads: int | None = None,
              compile: bool = False):
    """What runs the network: torch's Embedder, or OpenVINO's (its converted model kept beside the
    cache files it feeds, in `<model>/openvino/`; `threads` inference threads, the cores the decode
    workers leave, as torch's intra-op threads)."""
    if identity.engine == "openvino":
        from .openvino_engine import OpenVINOEmbedder

        return OpenVINOEmbedder(backbone, p.autocast, identity.preprocess, Path(path).parent / "openvino",
                                threads=threads)
    return Embedder(backbone, p.device, p.autocast, identity.preprocess, compile=compile)


def _and(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + f" and {names[-1]}"


def summary(results: dict[str, SplitResult], started: float) -> str:
    """One sentence: what was extracted, how fast, what was already cached, and where."""
    images = sum(r.images for r in results.values())
    where = ", ".join(sorted({str(r.path.parent) for r in results.values()}))
    hits = [r.split for r in results.values() if r.status == "hit"]
    updated = [f"{r.split}: {r.reuse}" for r in results.values() if r.status == "updated"]
    took = time.perf_counter() - started
    if not images and not updated:
        verb = "is" if len(hits) == 1 else "are"
        return f"Nothing to extract: {_and(hits)} {verb} already cached in {where} ({took:.1f} s)."
    rate = images / max(1e-9, sum(r.seconds for r in results.values()))
    text = f"Extracted {images:,} images in {took:.1f} s" + (f" ({rate:.1f} images/s)" if images else "")
    if updated:
        text += f"; updated {_and(updated)}"
    if hits:
        text += f"; {_and(hits)} {'was' if len(hits) == 1 else 'were'} already cached"
    return text + f". Features are in {where}."


# --- several models and taps in one command (python -m extract --model a,b --layer all) ---------

ALL_TAPS = "all"


def check_model(model: str, weights: str | None = "default"):
    """The registry spec `model` names; UserError (with close matches) for an unknown architecture,
    weights tag or missing checkpoint file. Nothing is built, loaded or downloaded."""
    from .models import get_spec, list_models, names_a_file

    known = {k.lower() for k in list_models()}
    arch, _, tag = ("", "", "") if model.lower().replace("-", "_") in known else model.partition(".")
    spec = get_spec(arch or model)
    given = "none" if weights is None else str(weights)
    if tag and given.lower() not in ("default", "") and given.lower() != tag.lower():
        raise UserError(f"--model {model} already names weights {tag!r}; drop --weights {given} "
                        f"or use --model {spec.name} --weights {given}")
    choice = tag or given
    if choice.lower() in ("default", "", "none"):
        return spec
    if names_a_file(spec, choice):
        if not Path(choice).expanduser().is_file():
            raise UserError(f"checkpoint file not found: {Path(choice).expanduser()}")
        return spec
    spec.weight(choice)  # UserError naming the available tags
    return spec


def expand_layers(model: str, layers: Sequence[str] | None) -> list[str] | None:
    """`layers` with 'all' replaced by the model's default tap (penultimate), then every registry tap
    in depth order; penultimate stays first so it remains the file's default layer. None stays None.

    Names that are neither taps nor 'all' are checked as module paths on a meta-device copy of the
    network (UserError with close matches), so a bad one is reported before any work starts."""
    if not layers:
        return None
    from .backbone import measure_dims

    spec = check_model(model)
    out: list[str] = []
    for layer in layers:
        out += [PENULTIMATE, *spec.taps] if layer.lower() == ALL_TAPS else [layer]
    out = list(dict.fromkeys(out))
    other = [t for t in out if t != PENULTIMATE and t not in spec.taps]
    if other:
        measure_dims(spec, other)
    return out
