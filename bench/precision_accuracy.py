"""Does reduced precision cost accuracy? bf16 vs fp32 features, same images, same probe.

For each image folder (train + val/test splits), extracts features at fp32 and at --precision
(real autocast, not a simulation), fits probe's logistic-regression head on each with the same
protocol, and prints both test top-1 scores, their difference in points and the features' cosine
agreement.

    python bench/precision_accuracy.py --roots ../shared/assets/hymenoptera_data /tmp/cifar10-tiny
    python bench/precision_accuracy.py --engine openvino --roots ../shared/assets/hymenoptera_data /tmp/hymenoptera_12mp
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from extract import extract, load_features
from extract.core.errors import UserError
from probe.api import evaluate


def logreg_top1(train_h5: Path, results: Path) -> float:
    """Test top-1 of probe's logreg head (fast grid) on one extraction (the train file and its siblings)."""
    try:
        (run,) = evaluate("logreg", features=train_h5, results_dir=results, save=False, progress=False).runs
    except UserError as e:
        raise SystemExit(f"probe failed on {train_h5}: {e}") from None
    return run.result["metrics"]["top1"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roots", nargs="+", required=True, help="image folders with train/ and val/ or test/")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--engine", default="torch", help="torch or openvino (both precisions run on it)")
    ap.add_argument("--cache-dir", help="keep the caches here (default: a temporary folder)")
    args = ap.parse_args()
    print(f"{args.model}, --engine {args.engine}: fp32 vs {args.precision} features, probe logreg --grid fast, "
          f"{torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(args.cache_dir or tmp) / "cache"
        for root in map(Path, args.roots):
            row = {}
            for precision in ("fp32", args.precision):
                start = time.perf_counter()
                res = extract(model=args.model, data="imagefolder", root=str(root), cache_dir=cache,
                              precision=precision, engine=args.engine, progress=False)
                seconds = time.perf_counter() - start
                row[precision] = (res, logreg_top1(res["train"].path, Path(tmp) / "results"), seconds)
            (res32, top32, s32), (res16, top16, s16) = row["fp32"], row[args.precision]
            test = [s for s in res32 if s != "train"][-1]
            a, b = load_features(res32[test].path).X, load_features(res16[test].path).X
            cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
            n_train, n_test = len(load_features(res32["train"].path).y), len(a)
            print(f"{root.name} ({n_train} train / {n_test} {test}): top-1 fp32 {100 * top32:.2f}  "
                  f"{args.precision} {100 * top16:.2f}  difference {100 * (top16 - top32):+.2f} points; "
                  f"feature cosine mean {cos.mean():.5f} min {cos.min():.5f}; "
                  f"extraction fp32 {s32:.0f} s, {args.precision} {s16:.0f} s")


if __name__ == "__main__":
    main()
