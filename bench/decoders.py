"""JPEG decoders side by side: per-image decode time and what each one does to a probe's accuracy.

For each image folder (train + val), in one run:

  decode ms     per image, one thread, the file's bytes already read: PIL's full decode (`open_rgb`),
                torchvision's decode_jpeg, TorchCodec's decode_jpeg (when installed), and PIL at a
                reduced DCT scale (`--decoder draft`: the largest of 1/2, 1/4, 1/8 that keeps twice
                the resize target on the short side; "draft1": once the resize target, for comparison)
  + resize ms   the same plus the resize and centre crop to uint8, as extraction's workers do it
                (DecodedFiles, per --decoder)
  top-1         probe's logreg head (fast grid) on features extracted with each decoder (fp32, so
                that only the decoder differs), test = the val split; feature cosine against the
                tensor decoder's, and the extraction's seconds

Timings take turns decoder by decoder within each repeat (medians). The 12 MP folder is made from the
ants/bees photos by bench/large_photos.py (every second photo fitted to 4032 x 3024).

    python bench/decoders.py --large /tmp/hymenoptera_12mp --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from extract import extract, load_features
from extract.compute import pipeline
from extract.compute.pipeline import DecodedFiles
from extract.registry.datasets import load_dataset
from extract.registry.images import (decode_jpeg_draft, decode_jpeg_file, decode_jpeg_torchcodec, draft_scale,
                                     torchcodec_available)
from extract.registry.models import resolve_weights

from large_photos import make_large_photos   # bench/ is on sys.path when this file runs as a script
from precision_accuracy import logreg_top1

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


def decoders(wanted: str) -> list[str]:
    names = [d for d in wanted.split(",") if d]
    return [d for d in names if d != "torchcodec" or torchcodec_available()]


@contextmanager
def decoder_margin(name: str):
    """'draft1' is the draft decoder with a margin of 1 (pipeline.DRAFT_MARGIN) while the block runs."""
    saved = pipeline.DRAFT_MARGIN
    pipeline.DRAFT_MARGIN = 1 if name == "draft1" else saved
    try:
        yield "draft" if name == "draft1" else name
    finally:
        pipeline.DRAFT_MARGIN = saved


def decode_only(decoder: str, min_side: int):
    """bytes -> decoded image, as each decoder does it for a JPEG (no resize)."""
    return {"pil": lambda path, data: _pil_full(data),
            "tensor": decode_jpeg_file,
            "torchcodec": decode_jpeg_torchcodec,
            "draft": lambda path, data: decode_jpeg_draft(path, data, min_side=pipeline.DRAFT_MARGIN * min_side),
            "draft1": lambda path, data: decode_jpeg_draft(path, data, min_side=min_side)}[decoder]


def _pil_full(data: bytes):
    """PIL's full decode of the bytes, EXIF-oriented RGB (what open_rgb does after reading the file)."""
    import io

    from PIL import Image

    from extract.registry.images import _oriented, to_rgb

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return to_rgb(_oriented(im))


def per_image_ms(fn, items) -> float:
    start = time.perf_counter()
    for item in items:
        fn(*item)
    return (time.perf_counter() - start) / len(items) * 1000


def timings(root: Path, names: list[str], preprocess, limit: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{decoder: (median decode-only ms, median decode + resize + crop ms)} per image, one thread."""
    torch.set_num_threads(1)
    source = load_dataset("imagefolder", root=str(root)).splits["train"]
    n = min(limit, len(source))
    paths = source.paths[:n]
    datas = [Path(p).read_bytes() for p in paths]
    files = {}
    for d in names:
        with decoder_margin(d) as name:
            files[d] = DecodedFiles(source, preprocess, decoder=name)
    decode = {d: decode_only(d, preprocess.resize) for d in names}
    for d in names:   # warm-up: imports, first allocations
        decode[d](paths[0], datas[0])
        files[d].decode_on_cpu(0, data=datas[0])
    raw: dict[str, list[float]] = {d: [] for d in names}
    full: dict[str, list[float]] = {d: [] for d in names}
    for _ in range(repeats):
        for d in names:
            raw[d].append(per_image_ms(decode[d], list(zip(paths, datas))))
            full[d].append(per_image_ms(lambda i, data: files[d].decode_on_cpu(i, data=data),
                                        list(zip(range(n), datas))))
    torch.set_num_threads(os.cpu_count() or 1)
    return {d: (statistics.median(raw[d]), statistics.median(full[d])) for d in names}


def accuracy(root: Path, names: list[str], model: str, cache: Path, results: Path) -> dict[str, tuple]:
    """{decoder: (top-1, cosine mean, cosine min vs tensor, extraction seconds, train/test sizes)}."""
    rows, feats = {}, {}
    for d in names:
        start = time.perf_counter()
        with decoder_margin(d) as name:
            res = extract(model=model, data="imagefolder", root=str(root), cache_dir=cache / d, precision="fp32",
                          decoder=name, workers=0, progress=False)
        seconds = time.perf_counter() - start
        test = [s for s in res if s != "train"][-1]
        feats[d] = load_features(res[test].path).X
        sizes = (len(load_features(res["train"].path).y), len(feats[d]))
        rows[d] = (logreg_top1(res["train"].path, results), seconds, sizes)
    ref = feats.get("tensor", feats[names[0]])
    out = {}
    for d, (top1, seconds, sizes) in rows.items():
        a = feats[d].astype(np.float64)
        cos = np.sum(a * ref, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(ref, axis=1))
        out[d] = (top1, float(cos.mean()), float(cos.min()), seconds, sizes)
    return out


def scales(root: Path, min_side: int) -> str:
    from collections import Counter

    from PIL import Image

    counts = Counter()
    for p in sorted(root.glob("*/*/*")):
        with Image.open(p) as im:
            counts[draft_scale(im.size, min_side)] += 1
    return ", ".join(f"1/{s}: {counts[s]}" for s in sorted(counts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(ASSETS / "hymenoptera_data"))
    ap.add_argument("--large", help="folder of 12 MP photos (made from --root when missing)")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--decoders", default="pil,tensor,torchcodec,draft,draft1")
    ap.add_argument("--images", type=int, default=120, help="images timed per decoder and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args()
    names = decoders(args.decoders)
    preprocess = resolve_weights(args.model).preprocess
    with tempfile.TemporaryDirectory() as tmp:
        large = Path(args.large or Path(tmp) / "large")
        made = make_large_photos(Path(args.root), large)
        print(f"{args.model} (resize {preprocess.resize}, crop {preprocess.crop}, {preprocess.interpolation}); "
              f"{os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; medians of {args.repeats}")
        for root in (Path(args.root), large):
            n = sum(1 for p in root.glob("*/*/*") if p.is_file())
            print(f"\n{root.name}: {n} JPEGs" + (f" ({made} at 4032 x 3024)" if root == large else "")
                  + f"; DCT scales for draft {scales(root, pipeline.DRAFT_MARGIN * preprocess.resize)}, "
                  f"for draft1 {scales(root, preprocess.resize)}")
            t = timings(root, names, preprocess, args.images, args.repeats)
            acc = {} if args.no_accuracy else accuracy(root, names, args.model, Path(tmp) / "cache",
                                                       Path(tmp) / "results")
            base = t.get("tensor", t[names[0]])[1]
            for d in names:
                raw, full = t[d]
                line = f"  {d:<11} decode {raw:7.2f} ms  + resize {full:7.2f} ms ({base / full:4.2f}x tensor)"
                if d in acc:
                    top1, cmean, cmin, seconds, (ntr, nte) = acc[d]
                    line += (f"   top-1 {100 * top1:6.2f} ({ntr} train / {nte} val)  cosine vs tensor "
                             f"{cmean:.5f} / {cmin:.5f}  extraction {seconds:5.1f} s")
                print(line, flush=True)


if __name__ == "__main__":
    main()
