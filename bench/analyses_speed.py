"""Seconds and peak memory of `probe rank`, `probe similarity` and `probe --head retrieval` on
synthetic N x D caches (planted class structure), each command in a fresh process.

    python bench/analyses_speed.py --sizes 10000 40000 --dim 2048 --classes 100

Peak RSS that does not grow with N shows that the scores stream the cache: the train split's
float32 features alone are N * D * 4 bytes (82 MB at 10,000 x 2,048, 328 MB at 40,000).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from extract.store.cache import write_features          # noqa: E402
from extract.store.identity import DataRef, FeatureIdentity  # noqa: E402
from extract.store.preprocess import Preprocess          # noqa: E402


def write_backbone(cache: Path, data: str, model: str, n: int, dim: int, classes: int, sep: float) -> None:
    """train (n rows) and test (n / 5 rows) of features with class centres `sep` apart in noise."""
    identity = FeatureIdentity(data=DataRef(data), model=model, weights_sha256=None, preprocess=Preprocess(),
                               precision="fp32")
    centres = np.random.default_rng(1).normal(size=(classes, dim)).astype(np.float32) * sep
    for split, rows, seed in (("train", n, 2), ("test", n // 5, 3)):
        rng = np.random.default_rng(seed)
        y = np.arange(rows) % classes
        X = centres[y] + rng.standard_normal((rows, dim), dtype=np.float32)
        write_features(identity, cache, split, {"penultimate": np.maximum(X, 0)}, y, None,
                       {"classes": [f"c{i}" for i in range(classes)]})


# `python -m probe ARGS` that reports its own peak RSS (KiB) on its last stderr line
CHILD = ("import resource, sys; from probe.cli import main; rc = main(sys.argv[1:]); "
         "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")


def timed(args: list[str]) -> tuple[float, float, str]:
    """(seconds, peak RSS in MiB, stdout) of `python -m probe ARGS` in a fresh process."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *args, "--no-progress"], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    return time.perf_counter() - start, int(proc.stderr.strip().splitlines()[-1]) / 1024, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000])
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=100)
    args = ap.parse_args()
    print(f"D = {args.dim}, {args.classes} classes; a fresh process per command, its own peak RSS")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sorted(args.sizes):
            cache, results, data = Path(tmp) / f"cache{n}", Path(tmp) / f"results{n}", f"bench{n}"
            write_backbone(cache, data, "strong", n, args.dim, args.classes, 0.5)
            write_backbone(cache, data, "weak", n, args.dim, args.classes, 0.15)
            common = ["--data", data, "--cache-dir", str(cache), "--results-dir", str(results)]
            seconds, rss, _ = timed(["rank", "--model", "all", *common])
            saved = json.loads((results / data / "rank.json").read_text())
            parts = "; ".join(f"{r['backbone']}: moments {r['seconds']['moments']} s, LogME {r['seconds']['logme']} s, "
                              f"H-score {r['seconds']['hscore']} s" for r in saved["rows"])
            print(f"N = {n:>6}: rank (2 backbones) {seconds:6.1f} s, peak RSS {rss:7.1f} MiB   [{parts}]")
            seconds, rss, _ = timed(["similarity", "--model", "strong,weak", "--split", "train",
                                     "--estimator", "debiased", *common])
            print(f"N = {n:>6}: similarity (train split) {seconds:6.1f} s, peak RSS {rss:7.1f} MiB")
            seconds, rss, out = timed(["--head", "retrieval", "--model", "strong", *common])
            detail = next(line.strip() for line in out.splitlines() if line.strip().startswith("recall"))
            print(f"N = {n:>6}: retrieval ({n // 5} queries) {seconds:6.1f} s, peak RSS {rss:7.1f} MiB   [{detail}]")


if __name__ == "__main__":
    main()
