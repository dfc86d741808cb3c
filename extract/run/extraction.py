"""One request -> one complete cache file per split, reusing what matches.

`plan` turns the request into a FeatureIdentity once; each split's file is asked for its verdict
(hit, taps to add, images that changed, or a conflict); what is missing is cut into chunks that
the request's runner computes; the leader assembles the file.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from extract.compute.allocator import malloc_tuned, tune_malloc
from extract.compute.engines import get_engine, resolve_engine
from extract.core.errors import UserError
from extract.registry.models import ResolvedWeights
from extract.registry.datasets import Dataset
from extract.run.hits import cached, remove_stale_partial
from extract.run.job import SplitJob
from extract.run.outcome import SplitResult, summary  # noqa: F401 - re-exported
from extract.run.plan import COMPILE_HINT, plan
from extract.run.request import ExtractRequest
from extract.run.runners import Runner, Work, choose_runner
from extract.store import cache
from extract.store.assemble import assemble
from extract.store.cache import partial_path
from extract.store.chunks import ChunkStore
from extract.store.identity import FeatureIdentity, describe_differences, verdict
from extract.store.incremental import Reuse, can_reuse, stamps_of
from extract.store.incremental import plan as incremental_plan

log = logging.getLogger(__name__)


def run_request(request: ExtractRequest, weights: ResolvedWeights | None = None,
                dataset: Dataset | None = None) -> dict[str, SplitResult]:
    """Extract (or reuse) features for every split the request names; returns {split: SplitResult}.

    `weights`, `dataset`: the request's weights and dataset when the caller has them already. On the CPU glibc's
    malloc is tuned for the process first (`extract.compute.allocator`; FEATPROBE_MALLOC_TUNING=0
    turns that off). Work is done in chunks of `request.chunk_rows` images (extract.store.chunks):
    an interrupted run resumes at the missing chunks, and an image folder that changed since its
    cache was made reuses the rows of unchanged files (extract.store.incremental).
    """
    runner = choose_runner(request)
    if request.compile and not runner.local:
        raise UserError(COMPILE_HINT)
    request = request.replace(device=runner.device(request.device))
    if get_engine(resolve_engine(request.engine, request.device, request.precision)).device(request.device).type \
            == "cpu":
        tune_malloc()
    p = plan(request, weights=weights, dataset=dataset, progress=request.progress and runner.leader)
    dataset = p.dataset
    wanted = list(request.splits or dataset.splits)
    unknown = [s for s in wanted if s not in dataset.splits]
    if unknown:
        raise UserError(f"dataset {request.data} has no split {unknown[0]!r}; it has {', '.join(dataset.splits)}")
    cache.check_cache_root(request.cache_dir)
    results: dict[str, SplitResult] = {}
    backbone = None
    for split in wanted:
        source = dataset.splits[split]
        if len(source) == 0:
            raise UserError(f"split {split} of {request.data} has no images")
        path = p.identity.cache_path(request.cache_dir, split)
        stamps = stamps_of(source.paths) if source.paths is not None else None
        fingerprint = source.fingerprint(stamps)
        identity = p.identity
        if not request.overwrite and runner.broadcast(cached(path, identity, fingerprint)):
            results[split] = SplitResult(split, path, "hit")   # a hit needs no lock: the folder may be read-only
            if runner.leader:
                remove_stale_partial(path)
            continue
        created = cache.missing_dirs(path.parent) if runner.leader else []
        lock = cache.lock_for(path) if runner.leader else None
        if lock is not None:
            cache.acquire(lock, path, log.info)
        try:
            runner.barrier()
            header = cache.read_header(path)
            reuse = Reuse.none(len(source))
            if header and header["damaged"]:
                if runner.leader:
                    log.warning(f"warning: {path} is damaged ({header['damaged']}); extracting it again")
            elif header and not request.overwrite:
                stored = header["identity"]
                v = verdict(stored, header.get("fingerprint"), identity, fingerprint)
                if v.hit:
                    results[split] = SplitResult(split, path, "hit")
                    continue
                grown = v.conflicts == ("fingerprint",) and source.paths is not None and can_reuse(path)
                if v.conflicts and not grown:
                    raise UserError(_conflict_message(path, v.conflicts, stored, identity))
                identity = identity.with_taps(stored.taps + v.missing_taps)
                if grown and not v.missing_taps:
                    reuse = incremental_plan(path, source.paths, stamps)
            if backbone is None or set(backbone.layers) != set(identity.taps):
                backbone = p.load_backbone(identity.taps)
                if identity.image_size is not None and identity.image_size < p.weights.preprocess.crop:
                    check_runs_at(backbone, identity)
            results[split] = _extract_split(Work(p, identity, backbone, path, _desc(identity, source, runner)),
                                            source, stamps, fingerprint, reuse, runner)
        finally:
            if lock is not None:
                lock.release()
                if split not in results:   # failed: leave no folder behind that holds only its lock
                    cache.discard_unused(lock, created)
    return results


def _desc(identity: FeatureIdentity, source, runner: Runner) -> str:
    return f"{identity.data.label}/{source.name}" + (f" rank {runner.rank}" if runner.world > 1 else "")


def _conflict_message(path: Path, conflicts, stored: FeatureIdentity | None, wanted: FeatureIdentity) -> str:
    text = f"{path} holds other features: {describe_differences(list(conflicts), stored, wanted)}"
    if stored is not None and "precision" in conflicts and wanted.precision_requested == "auto":
        text += (f"; --precision auto means {wanted.precision} here: pass --precision {wanted.precision} to "
                 f"extract {wanted.precision} features beside them")
    return text + "; pass --overwrite to replace them, or --cache-dir DIR to keep both"


def check_runs_at(backbone, identity: FeatureIdentity) -> None:
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


def provenance(work: Work, source, runner: Runner) -> dict:
    """What the cache file says about how its features were made (the runner adds what ran)."""
    p, identity, backbone, request = work.plan, work.identity, work.backbone, work.plan.request
    return {**backbone.provenance(), "model": identity.model, "weights": backbone.weights,
            "preprocess": identity.preprocess.as_dict(), "weights_preprocess": p.weights.preprocess.as_dict(),
            "image_size": identity.image_size, "normalization": p.normalization(identity),
            "dataset": p.dataset.name, "dataset_identity": p.dataset.identity, "split": source.name,
            "dataset_splits": list(p.dataset.splits),
            "classes": p.dataset.classes, "n_images": len(source), "dtype": identity.dtype,
            "precision": identity.precision, "precision_requested": identity.precision_requested,
            "device": str(p.device), "layers": backbone.layers, "dims": backbone.dims,
            "allow_missing_weights": request.allow_missing_weights, "engine": identity.engine,
            "decoder": identity.decoder, "malloc_tuning": malloc_tuned(), "chunk_rows": request.chunk_rows,
            "runner": runner.name, "processes": runner.world}


def _extract_split(work: Work, source, stamps, fingerprint: str, reuse: Reuse, runner: Runner) -> SplitResult:
    identity, backbone, path, request = work.identity, work.backbone, work.cache_path, work.plan.request
    manifest = {"identity": identity.to_dict(), "split": source.name, "fingerprint": fingerprint,
                "dims": backbone.dims, "chunk_rows": request.chunk_rows, "n_images": len(source),
                "base": reuse.base_fingerprint}
    if runner.leader:
        if request.overwrite and partial_path(path).exists():
            log.info(f"--overwrite: discarding {partial_path(path)} of an earlier run")
            ChunkStore(path, manifest).remove()
        ChunkStore.open(path, manifest, log.info)
    runner.barrier()
    job = SplitJob(identity, source, stamps, fingerprint, ChunkStore(path, manifest), reuse, backbone.dims,
                   provenance(work, source, runner))
    missing = runner.broadcast(job.missing())
    store = job.store
    done_before = len(store.done())
    if runner.leader:
        if reuse.base is not None:
            log.info(f"{source.name}: {reuse.describe()}")
        if done_before:
            log.info(f"resuming {path.name}: {done_before} of {store.total} chunks already done")
    try:
        stats = runner.compute(job, work, missing)
        job.provenance.update(stats.provenance)   # what ran: engine details, device, workers, compile time
        if runner.leader:
            assemble(store, reuse, identity, source, stamps, fingerprint, job.provenance, backbone.dims)
        runner.barrier()
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
