"""`extract(...)`: dataset + backbone -> one complete cache file per split, reusing what matches."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import cache
from .datasets import load_dataset
from .engine import (Embedder, default_workers, effective_preprocess, precision_name, resolve_device,
                     resolve_precision, run)
from .errors import UserError
from .models import get_spec, load_backbone, names_a_file

DTYPES = ("float32", "float16")
ON_ERROR = ("skip", "stop")


@dataclass
class SplitResult:
    """Where one split's features are and how they got there."""

    split: str
    path: Path
    status: str  # "hit", "extracted" or "resumed"
    images: int = 0
    seconds: float = 0.0
    skipped: int = 0

    def __fspath__(self) -> str:
        return str(self.path)


def weights_label(model: str, weights: str | None) -> tuple[str, str | None]:
    """(weights id for provenance, directory suffix or None for the model's default)."""
    spec = get_spec(model)
    if weights is None or weights.lower() == "none":
        return "none", "none"
    if weights in ("", "default"):
        return spec.default_weights, None
    if names_a_file(spec, weights):
        path = Path(weights)
        if not path.is_file():
            raise UserError(f"weights file {weights} does not exist")
        return str(path.resolve()), path.name.split(".")[0]
    tag = spec.weight(weights).tag
    return tag, None if tag == spec.default_weights else tag


def dataset_dir_name(dataset) -> str:
    """Cache folder of a dataset: its registry name, or the folder name for image folders."""
    root = dataset.identity.get("root")
    if dataset.name == "imagefolder" and root:
        return f"{Path(root).name}"
    return dataset.name


def _weights_stat(weights_id: str) -> list | None:
    """Size and mtime of a local weights file: a changed file never reuses old features."""
    if os.path.isfile(weights_id):
        st = os.stat(weights_id)
        return [st.st_size, st.st_mtime_ns]
    return None


def split_key(model: str, weights_id: str, dataset, split: str, fingerprint: str, dtype: str,
              precision: str) -> dict:
    """Everything that must match for a cache file to be reused."""
    return {"format": cache.FORMAT, "model": model, "weights": weights_id, "weights_file": _weights_stat(weights_id),
            "dataset": dataset.identity, "split": split, "dataset_fingerprint": fingerprint, "dtype": dtype,
            "precision": precision}


def _describe(diff: list[str]) -> str:
    names = {"dataset_fingerprint": "the images changed", "weights_file": "the weights file changed",
             "dataset": "dataset options differ", "format": "older cache format"}
    return ", ".join(names.get(d, f"{d} differs") for d in diff)


def extract(model: str = "efficientnet_lite0", data: str = "digits", *, weights: str | None = "default",
            layers: Sequence[str] | None = None, root: str | None = None, download: bool = False,
            splits: Sequence[str] | None = None, cache_dir: str | os.PathLike = "cache", batch_size: int = 64,
            workers: int | None = None, device: str = "auto", precision: str = "auto", dtype: str = "float32",
            on_error: str = "skip", overwrite: bool = False, progress: bool = True,
            dataset_options: dict | None = None, log: Callable[[str], None] = print) -> dict[str, SplitResult]:
    """Extract (or reuse) features for every split of `data` with backbone `model`; returns {split: SplitResult}."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}: use {' or '.join(DTYPES)}")
    if on_error not in ON_ERROR:
        raise UserError(f"unknown --on-error {on_error!r}: use {' or '.join(ON_ERROR)}")
    if batch_size < 1:
        raise UserError("batch size must be at least 1")
    spec = get_spec(model)
    weights_id, weights_dir = weights_label(model, weights)
    dataset = load_dataset(data, root=root, download=download, **(dataset_options or {}))
    wanted = list(splits or dataset.splits)
    unknown = [s for s in wanted if s not in dataset.splits]
    if unknown:
        raise UserError(f"dataset {data} has no split {unknown[0]!r}; it has {', '.join(dataset.splits)}")
    layers = list(layers or ["penultimate"])
    dev = resolve_device(device)
    autocast = resolve_precision(precision, dev)
    computed = precision_name(autocast)
    results: dict[str, SplitResult] = {}
    backbone = None
    for split in wanted:
        source = dataset.splits[split]
        if len(source) == 0:
            raise UserError(f"split {split} of {data} has no images")
        path = cache.cache_path(cache_dir, dataset_dir_name(dataset), spec.name, weights_dir, split, dtype, computed)
        key = split_key(spec.name, weights_id, dataset, split, source.fingerprint(), dtype, computed)
        lock = cache.lock_for(path)
        cache.acquire(lock, path, log)
        try:
            header = cache.read_header(path) if path.exists() else None
            if header and not overwrite:
                diff = cache.key_differences(header["key"], key)
                if diff:
                    raise UserError(f"{path} was extracted from different inputs ({_describe(diff)}); "
                                    f"pass --overwrite to replace it")
                if set(layers) <= set(header["layers"]):
                    results[split] = SplitResult(split, path, "hit")
                    continue
                layers = sorted(set(layers) | set(header["layers"]))
            if backbone is None or set(backbone.layers) != set(layers):
                backbone = _load(spec.name, weights, layers)
            results[split] = _extract_split(backbone, dataset, source, path, key, dev, autocast, precision, dtype,
                                            batch_size, workers, on_error, progress, log)
        finally:
            lock.release()
    return results


def _load(model: str, weights, layers):
    """The backbone; random init ('none') is seeded so every run of one key sees the same network."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_backbone(model, weights=weights, layers=layers)


def _extract_split(backbone, dataset, source, path, key, dev, autocast, precision, dtype, batch_size, workers,
                   on_error, progress, log) -> SplitResult:
    preprocess = effective_preprocess(backbone.preprocess, source.arrays is not None)
    provenance = {**backbone.provenance(), "model": backbone.name, "weights": backbone.weights,
                  "preprocess": preprocess.as_dict(), "dataset": dataset.name, "dataset_identity": dataset.identity,
                  "dataset_fingerprint": key["dataset_fingerprint"], "split": source.name, "classes": dataset.classes,
                  "n_images": len(source), "dtype": dtype, "precision": key["precision"],
                  "precision_requested": precision, "device": str(dev), "layers": backbone.layers,
                  "dims": backbone.dims}
    writer = cache.CacheWriter(path, key, provenance, backbone.dims, dtype)
    status = "resumed" if writer.resumed_from else "extracted"
    if writer.resumed_from:
        log(f"resuming {path.name} at image {writer.resumed_from} of {len(source)}")
    embedder = Embedder(backbone, dev, autocast, preprocess)
    workers = default_workers(dev) if workers is None else workers
    try:
        stats = run(embedder, source, writer, batch_size=batch_size, workers=workers, on_error=on_error,
                    progress=progress, desc=f"{dataset.name}/{source.name}")
        writer.finish()
    except KeyboardInterrupt:
        writer.close()
        raise KeyboardInterrupt(f"{writer.saved_rows} of {len(source)} images of {source.name} saved in "
                                f"{writer.partial}; rerun the same command to resume") from None
    except OSError as e:
        _close_quietly(writer, flush=False)
        raise UserError(f"could not write {writer.partial}: {e.strerror or e}; the {writer.saved_rows} rows "
                        f"written before are kept: free space and rerun the same command to resume") from None
    except BaseException:
        _close_quietly(writer)
        raise
    if stats.skipped:
        shown = "; ".join(f"{Path(p).name}: {r}" for _, p, r in stats.skipped[:3])
        log(f"skipped {len(stats.skipped)} unreadable image(s) in {source.name} ({shown}"
            + (" ..." if len(stats.skipped) > 3 else "") + "); recorded in the cache under skipped/")
    return SplitResult(source.name, path, status, stats.images, stats.seconds, len(stats.skipped))


def _close_quietly(writer, flush: bool = True) -> None:
    try:
        writer.close(flush=flush)
    except Exception:
        pass


def summary(results: dict[str, SplitResult], started: float) -> str:
    """One line: images, seconds, where the cache is."""
    images = sum(r.images for r in results.values())
    where = {str(r.path.parent) for r in results.values()}
    hits = [r.split for r in results.values() if r.status == "hit"]
    parts = [f"{images} images extracted" if images else "nothing to extract",
             f"in {time.perf_counter() - started:.1f} s"]
    if images:
        parts.append(f"({images / max(1e-9, sum(r.seconds for r in results.values())):.1f} img/s)")
    if hits:
        parts.append(f"cache hit for {', '.join(hits)}")
    return " ".join(parts) + f"; cache: {', '.join(sorted(where))}"
