"""Extraction throughput, side by side in one process, on the real ants/bees images.

  pure     the backbone's forward on pre-loaded, pre-normalised tensors (same device, precision, batch)
  full     featprobe's pipeline: files -> workers -> device -> backbone -> HDF5 (fresh cache)
  naive    the PyTorch transfer-learning tutorial's loop: ImageFolder + PIL transforms, fp32 NCHW,
           per-batch .cpu().numpy() append
  hit      rerunning `extract` on a complete cache

Prints images/s (median of --repeats) and the ratios full/pure, full/naive, hit/full.

    python bench/extract_speed.py --model efficientnet_lite0 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torchvision import datasets, transforms

from extract.api import extract
from extract.registry.datasets import load_dataset
from extract.compute.engine import Embedder, effective_preprocess, resolve_device, resolve_precision
from extract.registry.models import load_backbone

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def pure_forward(backbone, images: torch.Tensor, batch_size: int, device, precision) -> float:
    """Images/s of the forward pass alone on uint8 tensors already resized (normalised on the device)."""
    embedder = Embedder(backbone, device, precision, backbone.preprocess)
    embedder(images[:batch_size])  # warm-up
    start = time.perf_counter()
    for a in range(0, len(images), batch_size):
        out = embedder(images[a:a + batch_size])
    next(iter(out.values())).cpu()
    return len(images) / (time.perf_counter() - start)


def full_pipeline(model, root, batch_size, workers, precision, cache_dir) -> tuple[float, float]:
    """(images/s of a fresh extraction, seconds of the cache hit that follows)."""
    start = time.perf_counter()
    res = extract(model=model, data="imagefolder", root=str(root), cache_dir=cache_dir, batch_size=batch_size,
                  workers=workers, precision=precision, progress=False)
    seconds = time.perf_counter() - start
    images = sum(r.images for r in res.values())
    start = time.perf_counter()
    extract(model=model, data="imagefolder", root=str(root), cache_dir=cache_dir, batch_size=batch_size,
            workers=workers, precision=precision, progress=False)
    return images / seconds, time.perf_counter() - start


def naive_loop(backbone, root: Path, batch_size: int, workers: int) -> float:
    """The tutorial's fixed-feature-extractor loop (fp32, NCHW, PIL resize, per-batch numpy append)."""
    p = backbone.preprocess
    tf = transforms.Compose([transforms.Resize(p.resize), transforms.CenterCrop(p.crop), transforms.ToTensor(),
                             transforms.Normalize(p.mean, p.std)])
    model = backbone.to(memory_format=torch.contiguous_format).eval()
    start, n = time.perf_counter(), 0
    for split in ("train", "val"):
        loader = torch.utils.data.DataLoader(datasets.ImageFolder(root / split, tf), batch_size=batch_size,
                                             num_workers=workers)
        feats = []
        with torch.no_grad():
            for x, _ in loader:
                feats.append(model(x)["penultimate"].cpu().numpy())
                n += len(x)
        np.concatenate(feats)
    return n / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--root", default=str(ASSETS / "hymenoptera_data"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    root = Path(args.root)
    device = resolve_device("auto")
    autocast = resolve_precision(args.precision, device)
    backbone = load_backbone(args.model)
    dataset = load_dataset("imagefolder", root=str(root))
    prep = effective_preprocess(backbone.preprocess, False)
    images = torch.stack([prep.resize_crop_pil(s.load(i)) for s in dataset.splits.values() for i in range(len(s))])
    print(f"{args.model} on {root.name}: {len(images)} images, batch {args.batch_size}, device {device}, "
          f"precision {autocast or 'fp32'}, {torch.get_num_threads()} threads, {args.workers} worker(s)")

    rows = {"pure": [], "full": [], "naive": [], "hit_s": [], "full_s": []}
    for r in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            rows["pure"].append(pure_forward(backbone, images, args.batch_size, device, autocast))
            full, hit = full_pipeline(args.model, root, args.batch_size, args.workers, args.precision, tmp)
            rows["full"].append(full)
            rows["full_s"].append(len(images) / full)
            rows["hit_s"].append(hit)
            rows["naive"].append(naive_loop(backbone, root, args.batch_size, args.workers))
        print(f"  repeat {r + 1}: pure {rows['pure'][-1]:.1f}  full {full:.1f}  naive {rows['naive'][-1]:.1f} img/s"
              f"  hit {hit:.2f} s")
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"median images/s: pure forward {med['pure']:.1f} | full pipeline {med['full']:.1f} | "
          f"naive tutorial loop {med['naive']:.1f}")
    print(f"full / pure  = {med['full'] / med['pure']:.2f}   (target >= 0.85)")
    print(f"full / naive = {med['full'] / med['naive']:.2f}   (target >= 3)")
    print(f"cache hit    = {med['hit_s']:.2f} s vs {med['full_s']:.1f} s extraction "
          f"= {100 * med['hit_s'] / med['full_s']:.2f}%   (target < 2%)")


if __name__ == "__main__":
    main()
