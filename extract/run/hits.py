"""A cache hit without torch: the identity of a request on a CPU, from the light registry, and the files.

`lookup` computes the identity `extract.run.plan` would compute, with the same code
(`extract.run.identify`), where it can know every part without torch: the process runner, the torch
engine on a CPU (`--device cpu`, or `auto` on a machine with no GPU device at all), weights of a
registry entry described without torch (`extract.registry.builtin`) that are already on disk, taps
that entry names, and the weights' own normalisation. Image files decoded by torchvision
('tensor') are a hit only when the file was written with the torchvision installed now (the
decoder it recorded was available then, so it is now). Anything else is left to `run_request`.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from extract.core.errors import UserError
from extract.core.precision import cpu_precision
from extract.registry import builtin
from extract.registry.datasets import Dataset, load_dataset
from extract.registry.spec import ALL_TAPS, tap_names
from extract.registry.weights import resolve_for
from extract.run.identify import identity_of, in_memory, input_geometry
from extract.run.outcome import SplitResult
from extract.run.request import ExtractRequest
from extract.run.runners import launched
from extract.store import cache
from extract.store.chunks import ChunkStore
from extract.store.identity import PENULTIMATE, FeatureIdentity, verdict
from extract.store.incremental import stamps_of
from extract.store.modelref import ModelRef

log = logging.getLogger(__name__)
TENSOR = "tensor"


def cached(path: Path, identity: FeatureIdentity, fingerprint: str) -> bool:
    """Whether the complete file at `path` already holds these features."""
    return _hit(cache.read_header(path), identity, fingerprint)


def _hit(header: dict | None, identity: FeatureIdentity, fingerprint: str) -> bool:
    if not header or header["damaged"]:
        return False
    return verdict(header["identity"], header.get("fingerprint"), identity, fingerprint).hit


def gpu_possible() -> bool:
    """Whether torch could find a GPU here: a CUDA or ROCm device or driver, WSL's GPU, or any system
    but Linux (macOS has MPS). Then `--device auto` is left to torch."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd", "/dev/dxg")) \
        or bool(glob.glob("/dev/nvidia[0-9]*"))


def _on_cpu_here(r: ExtractRequest) -> bool:
    """Whether the request runs on this process's CPU with the torch engine (known without torch)."""
    return (r.engine == "torch" and r.precision != "int8" and r.runner in ("auto", "process") and not r.ray
            and not launched() and (r.device == "cpu" or (r.device == "auto" and not gpu_possible())))


def _installed(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def quick_identity(request: ExtractRequest, dataset: Dataset | None = None) -> tuple[FeatureIdentity | None,
                                                                                    Dataset | None]:
    """(the identity `extract.run.plan` gives the request, or None where it cannot be known without torch;
    the dataset read on the way). `request.layers` as given (`all` and tap names are expanded here).
    A UserError is the request's own error (`plan` says it too). Image files get the decoder asked for,
    and 'tensor' for auto: true only where torchvision has its JPEG decoder (see `lookup`)."""
    r = request
    if r.overwrite or r.normalize != "weights" or r.decoder == "cuda" or not _on_cpu_here(r):
        return None, dataset
    ref = ModelRef.parse(r.model, r.weights, known=builtin.SPECS)
    spec = builtin.find(ref.arch)
    layers = list(r.layers or ())
    if spec is None or any(t.lower() != ALL_TAPS and t != PENULTIMATE and t not in spec.taps for t in layers):
        return None, dataset
    resolved = resolve_for(spec, ref, download=False)
    r = r.replace(layers=tap_names(spec, layers))
    if dataset is None:
        dataset = load_dataset(r.data, root=r.root, download=r.download, **r.options)
    arrays = in_memory(dataset)
    if arrays and r.decoder == TENSOR:
        return None, dataset
    image_size, preprocess = input_geometry(r, resolved, arrays)
    decoder = None if arrays else (r.decoder if r.decoder in ("pil", "torchcodec", "draft") else TENSOR)
    return identity_of(r, resolved, dataset.ref, preprocess, image_size, precision=cpu_precision(r.precision),
                       engine="torch", decoder=decoder), dataset


def lookup(request: ExtractRequest, dataset: Dataset | None = None) -> tuple[dict[str, SplitResult] | None,
                                                                            Dataset | None]:
    """({split: hit} when every split the request names is a complete hit, else None; the dataset read).

    Never imports torch and never raises a UserError: what it cannot decide, or what is wrong with
    the request, is left to `run_request`, which says the same as without this check. `dataset`:
    already read for another model of the same command.
    """
    try:
        identity, dataset = quick_identity(request, dataset)
        if identity is None:
            return None, dataset
        wanted = list(request.splits or dataset.splits)
        if any(s not in dataset.splits or len(dataset.splits[s]) == 0 for s in wanted):
            return None, dataset
        cache.check_cache_root(request.cache_dir)
        results = {}
        for split in wanted:
            source = dataset.splits[split]
            path = identity.cache_path(request.cache_dir, split)
            fingerprint = source.fingerprint(stamps_of(source.paths) if source.paths is not None else None)
            header = cache.read_header(path)
            if not _hit(header, identity, fingerprint) or not _decoder_known(header, identity.decoder):
                return None, dataset
            results[split] = SplitResult(split, path, "hit")
    except UserError:
        return None, dataset
    for result in results.values():
        remove_stale_partial(result.path)
    return results, dataset


def _decoder_known(header: dict, decoder: str | None) -> bool:
    """Whether `decoder` is the one `run_request` would use: 'tensor' needs torchvision's JPEG decoder,
    known to be here when the file that recorded it was written with the torchvision installed now."""
    if decoder != TENSOR:
        return True
    written = (header.get("versions") or {}).get("torchvision")
    return written is not None and written == _installed("torchvision")


def remove_stale_partial(path: Path) -> None:
    """Remove what an interrupted clean-up left of `.partial/` beside a finished file: a folder without its
    manifest, or the chunks of the very file that is finished. Chunks of other work (an interrupted run
    adding a tap) stay for their command to resume; so does anything a process writing there now holds
    (it holds the lock), and anything in a read-only cache folder."""
    store = ChunkStore.existing(path) or ChunkStore(path, {"chunk_rows": 1, "n_images": 0})
    if not store.dir.exists():
        return
    header = cache.read_header(path) or {}
    made_this = header.get("identity") is not None and \
        store.manifest.get("identity") == header["identity"].to_dict() and \
        store.manifest.get("fingerprint") == header.get("fingerprint")
    if store.read_manifest() is not None and not made_this:
        return
    try:
        lock = cache.lock_for(path)
        lock.acquire(timeout=0)
    except (UserError, OSError):   # filelock's Timeout is an OSError too
        return
    try:
        if store.dir.exists():
            log.info(f"removing {store.dir}, left from an earlier run beside the finished {path.name}")
            store.remove()
    finally:
        lock.release()
