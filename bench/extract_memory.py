"""Peak memory of an extraction does not grow with the number of images.

Extracts the first N training images of the CIFAR-10 JPEG folder (N = 10,000 and 50,000 by default)
with the CIFAR ResNet-20 backbone, each in a fresh subprocess, and prints the child's peak RSS.

    python bench/extract_memory.py --cifar /tmp/cifar10-jpg --sizes 10000 50000
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_subset(cifar: Path, n: int, dest: Path, start: int = 0) -> Path:
    """A train/<class>/ folder of symlinks to n images (balanced across classes), from image `start` of
    each class; a second call adds to the folder."""
    classes = sorted(os.listdir(cifar / "train"))
    per_class = -(-n // len(classes))
    for c in classes:
        (dest / "train" / c).mkdir(parents=True, exist_ok=True)
        for name in sorted(os.listdir(cifar / "train" / c))[start:start + per_class]:
            os.symlink(cifar / "train" / c / name, dest / "train" / c / name)
    return dest


def peak_rss_mib(args: list[str]) -> tuple[float, float]:
    """(peak RSS of the child in MiB, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "extract", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(proc.stderr)
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cifar", default="/tmp/cifar10-jpg", help="unpacked cifar10-jpg.tar")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10000, 50000])
    ap.add_argument("--model", default="cifar_resnet20")
    args = ap.parse_args()
    print(f"{args.model}, workers 1, batch 256; peak RSS of a fresh process per size")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        # ru_maxrss of RUSAGE_CHILDREN is the max over all children so far: run the sizes smallest first.
        for n in sorted(args.sizes):
            root = make_subset(Path(args.cifar), n, Path(tmp) / f"subset{n}")
            rss, seconds = peak_rss_mib(["--model", args.model, "--weights", "none", "--data", "imagefolder",
                                         "--root", str(root), "--cache-dir", str(Path(tmp) / f"cache{n}"),
                                         "--batch-size", "256", "--workers", "1", "--no-progress"])
            results.append((n, rss, seconds))
            print(f"  {n:>6} images: peak RSS {rss:7.1f} MiB  ({seconds:.0f} s, {n / seconds:.0f} img/s)")
    (n0, r0, _), (n1, r1, _) = results[0], results[-1]
    print(f"peak RSS ratio {n1}/{n0} images: {r1 / r0:.3f}  ({n1 / n0:.0f}x the images)")


if __name__ == "__main__":
    main()
