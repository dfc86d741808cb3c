"""Normalisation statistics of the user's own images (`--normalize dataset`).

One streaming pass over the train split, after the same resize + centre crop the network sees,
as uint8: exact per-channel integer sums of x and x**2 (memory does not grow with N), so the
result does not depend on the batch size or the order. mean and std are in [0, 1] units, as
`Preprocess.mean/std` are.

The statistics are remembered in a small JSON file beside the cache,
``<cache>/<data label>/normstats.<resize>-<crop>-<interpolation>.json``, holding the train split's
fingerprint: a later run with the same images and spatial preprocessing reads it instead of
streaming again; changed images (another fingerprint) are streamed once more and the file is
replaced. The statistics then become the Preprocess mean/std of the feature identity, so the
cache hit rule (`identity.verdict`) treats them as any other component.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import BatchSampler
from tqdm import tqdm

from extract.core.atomic import write_text_atomic
from extract.core.errors import UserError
from extract.compute.pipeline import SourceBatches
from extract.store.preprocess import Preprocess

STATS_SPLIT = "train"
MIN_STD = 1 / 255          # a constant channel would divide by zero: one grey level at least
log = logging.getLogger(__name__)
passes = 0                 # streaming passes made by this process (a cache hit makes none; tests read it)


def stats_path(cache_dir, data_label: str, preprocess: Preprocess) -> Path:
    """Where the statistics of one dataset under one spatial preprocessing are remembered."""
    squash = "-squash" if preprocess.squash else ""
    return (Path(cache_dir) / data_label /
            f"normstats.{preprocess.resize}-{preprocess.crop}-{preprocess.interpolation}{squash}.json")


def _spatial(preprocess: Preprocess) -> dict:
    out = {"resize": preprocess.resize, "crop": preprocess.crop, "interpolation": preprocess.interpolation}
    return {**out, "crop_mode": preprocess.crop_mode} if preprocess.squash else out


def dataset_stats(source, preprocess: Preprocess, *, cache_dir, data_label: str, device=None,
                  batch_size: int = 64, workers: int = 0, progress: bool = True) -> dict:
    """Per-channel mean and std (0-1 units) of `source` after `preprocess`'s resize + crop, remembered.

    Returns {"mean", "std", "split", "n_images", "skipped", "fingerprint", "spatial", "file", "cached"}.
    """
    path = stats_path(cache_dir, data_label, preprocess)
    fingerprint = source.fingerprint()
    stored = _read(path)
    fresh = stored is not None and stored.get("fingerprint") == fingerprint
    if fresh and stored.get("spatial") == _spatial(preprocess):
        return {**stored, "file": str(path), "cached": True}
    if stored is not None:
        log.info(f"the {source.name} images changed since {path.name} was computed: computing them again")
    stats = compute_stats(source, preprocess, device=device, batch_size=batch_size, workers=workers,
                          progress=progress, desc=f"{data_label}/{source.name} mean/std")
    stats = {**stats, "split": source.name, "fingerprint": fingerprint, "spatial": _spatial(preprocess),
             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    try:
        write_text_atomic(path, json.dumps(stats, indent=1, sort_keys=True))
    except OSError as e:   # the statistics are still right: only the next run streams again
        log.warning(f"could not remember the dataset statistics in {path}: {e.strerror or e}")
    return {**stats, "file": str(path), "cached": False}


def _read(path: Path) -> dict | None:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
        d["mean"], d["std"] = [float(v) for v in d["mean"]], [float(v) for v in d["std"]]
        if len(d["mean"]) != 3 or len(d["std"]) != 3:
            return None
        return d
    except (OSError, ValueError, KeyError, TypeError):
        return None


def compute_stats(source, preprocess: Preprocess, *, device=None, batch_size: int = 64, workers: int = 0,
                  progress: bool = True, desc: str = "") -> dict:
    """One pass over `source`: per-channel mean and std in [0, 1] of its resized + cropped uint8 pixels.

    Files are decoded and resized in DataLoader workers (as extraction does); in-memory arrays are
    resized on `device` and rounded to uint8. Unreadable files are left out and counted.
    """
    global passes
    passes += 1
    device = torch.device(device or "cpu")
    on_device = source.arrays is not None
    total = torch.zeros(3, dtype=torch.int64)
    squares = torch.zeros(3, dtype=torch.int64)
    pixels = images = skipped = 0
    batches = SourceBatches(source, preprocess, BatchSampler(range(len(source)), max(1, batch_size), False),
                            workers=workers)
    with tqdm(total=len(source), desc=desc, unit="img", disable=not progress, dynamic_ncols=True, leave=False) as bar:
        for x, positions, reasons in batches:
            keep = [k for k, r in enumerate(reasons) if not r]
            skipped += len(reasons) - len(keep)
            bar.update(len(positions))
            if not keep:
                continue
            x = x[keep] if len(keep) != len(reasons) else x
            x = _crop_sized_uint8(x.to(device) if on_device else x, preprocess)
            wide = x.to(torch.int64)
            total += wide.sum(dim=(0, 2, 3)).cpu()
            squares += (wide * wide).sum(dim=(0, 2, 3)).cpu()
            pixels += x.shape[0] * x.shape[2] * x.shape[3]
            images += x.shape[0]
    if not images:
        raise UserError(f"no readable images in the {source.name} split to compute mean and std from")
    n = float(pixels)
    mean = total.double().numpy() / n
    var = np.maximum(squares.double().numpy() / n - mean * mean, 0.0)
    std = np.sqrt(var)
    if (std < MIN_STD * 255).any():
        log.warning(f"a colour channel of {source.name} is (nearly) constant: its std is raised to 1/255")
    std = np.maximum(std / 255.0, MIN_STD)
    return {"mean": [float(v) for v in mean / 255.0], "std": [float(v) for v in std], "n_images": images,
            "skipped": skipped, "pixels": pixels}


def _crop_sized_uint8(x: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """A uint8 batch at the crop size: as `pipeline.to_model_input` resizes it, rounded back to uint8."""
    if tuple(x.shape[-2:]) == (preprocess.crop, preprocess.crop):
        return x
    return preprocess.resize_crop_batch(x).round_().clamp_(0, 255).to(torch.uint8)


def with_stats(preprocess: Preprocess, stats: dict) -> Preprocess:
    """`preprocess` normalised by the dataset's mean and std instead of the weights' own."""
    mean, std = tuple(float(v) for v in stats["mean"]), tuple(float(v) for v in stats["std"])
    if not all(math.isfinite(v) for v in mean + std):
        raise UserError("the dataset's mean/std are not finite numbers")
    return dataclasses.replace(preprocess, mean=mean, std=std)
