"""torch vs OpenVINO on the CPU: pure forward images/s and feature agreement, on the real ants/bees images.

Every configuration runs the same Embedder call extract makes (uint8 batch -> normalise -> network ->
{tap: float32}) on images pre-loaded and pre-resized in memory; configurations take turns within
each repeat (medians reported). Agreement: cosine of each image's features with torch fp32's.

    python bench/openvino_speed.py --repeats 3
    ONEDNN_MAX_CPU_ISA=AVX2 python bench/openvino_speed.py --repeats 3   # as an AVX2-only CPU

Under ONEDNN_MAX_CPU_ISA=AVX2 torch's bf16 is emulated (very slow): it is timed on --emulated-images
images only and its agreement is left out; OpenVINO bf16 is not offered there (it fails to run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from extract.registry.datasets import load_dataset
from extract.compute.engine import Embedder, cpu_has_bf16, effective_preprocess
from extract.registry.models import load_backbone
from extract.compute.engines.openvino_engine import OpenVINOEmbedder, version

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def rate(embedder, images: torch.Tensor, batch: int) -> float:
    embedder(images[:batch])   # warm-up
    start = time.perf_counter()
    for a in range(0, len(images), batch):
        embedder(images[a:a + batch])
    return len(images) / (time.perf_counter() - start)


def features(embedder, images: torch.Tensor, batch: int) -> np.ndarray:
    return np.concatenate([embedder(images[a:a + batch])["penultimate"].numpy() for a in range(0, len(images), batch)])


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--root", default=str(ASSETS / "hymenoptera_data"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=128, help="images timed per configuration and repeat")
    ap.add_argument("--emulated-images", type=int, default=32, help="images timed for emulated torch bf16")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    backbone = load_backbone(args.model)
    prep = effective_preprocess(backbone.preprocess, False)
    dataset = load_dataset("imagefolder", root=args.root)
    images = torch.stack([prep.resize_crop_pil(s.load(i)) for s in dataset.splits.values() for i in range(len(s))])
    native = cpu_has_bf16()
    print(f"{args.model}, {len(images)} ants/bees images, batch {args.batch_size}, {torch.get_num_threads()} torch "
          f"threads, ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(unset)')}, native bf16: {native}, "
          f"openvino {version()}")
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ov32 = OpenVINOEmbedder(backbone, None, prep, tmp)
        convert_s = time.perf_counter() - start
        start = time.perf_counter()
        OpenVINOEmbedder(backbone, None, prep, tmp)
        cached_s = time.perf_counter() - start
        print(f"OpenVINO: convert + compile {convert_s:.1f} s; from the saved IR, read + compile {cached_s:.2f} s")
        configs = {"torch fp32": Embedder(load_backbone(args.model), cpu, None, prep),
                   "torch bf16" + ("" if native else " (emulated)"): Embedder(load_backbone(args.model), cpu,
                                                                              torch.bfloat16, prep),
                   "openvino f32": ov32}
        if native:
            configs["openvino bf16"] = OpenVINOEmbedder(backbone, torch.bfloat16, prep, tmp)
        timed = {name: images[:args.emulated_images if "emulated" in name else args.images] for name in configs}
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for r in range(args.repeats):
            for name, emb in configs.items():
                rates[name].append(rate(emb, timed[name], args.batch_size))
            print(f"  repeat {r + 1}: " + "  ".join(f"{n} {v[-1]:.1f}" for n, v in rates.items()))
        ref = features(configs["torch fp32"], images, args.batch_size)
        print(f"{'configuration':<26} {'images/s':>9}  {'per repeat':<24} cosine vs torch fp32 (mean / min)")
        for name, emb in configs.items():
            agree = "-" if "emulated" in name else \
                "{:.7f} / {:.7f}".format(*(lambda c: (c.mean(), c.min()))(cosines(features(emb, images, args.batch_size),
                                                                                   ref)))
            print(f"{name:<26} {statistics.median(rates[name]):>9.1f}  "
                  f"{', '.join(f'{v:.1f}' for v in rates[name]):<24} {agree}")


if __name__ == "__main__":
    main()
