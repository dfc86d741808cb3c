"""Beyond one process, measured: torchrun and Ray against the plain process, and an incremental rerun.

On the same folder of CIFAR-10 JPEGs (--images per run, 10 classes), back to back, each a fresh
process with a fresh cache:

  process    python -m extract
  torchrun   python -m torch.distributed.run --standalone --nproc-per-node 2 -m extract
  ray        python -m extract --ray local        (needs pip install -e ".[ray]")

then the incremental case: the plain process's cache, 1% more images added to the folder, the
same command again, against the full run. Wall time is the whole process (start-up included);
"extract s" is what the summary line reports (from the request to the finished file). Medians of
--repeats.

    python bench/distributed_speed.py --cifar /tmp/cifar10-jpg --images 2000 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from extract_memory import make_subset  # noqa: E402


def timed(cmd: list[str], env=None) -> tuple[float, float]:
    """(whole-process seconds, the summary line's seconds)."""
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    found = re.search(r"Extracted [\d,]+ images in ([\d.]+) s", out.stdout)
    return wall, float(found.group(1)) if found else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", default="/tmp/cifar10-jpg", help="unpacked cifar10-jpg.tar")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--runners", default="process,torchrun,ray", help="which to time (the incremental case "
                    "always runs)")
    args = ap.parse_args()
    cifar = Path(args.cifar)
    if not (cifar / "train").is_dir():
        sys.exit(f"no CIFAR-10 JPEGs at {cifar}: tar xf ../shared/assets/cifar10-jpg.tar -C {cifar}")
    work = Path(tempfile.mkdtemp(prefix="featprobe-dist-"))
    root = work / "images"
    make_subset(cifar, args.images, root)
    py = sys.executable
    base = ["-m", "extract", "--model", args.model, "--data", "imagefolder", "--root", str(root), "--no-progress"]
    runners = {"process": [py, *base],
               "torchrun": [py, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.ranks),
                            *base]}
    try:
        import ray  # noqa: F401
        runners["ray"] = [py, *base, "--ray", "local"]
    except ImportError:
        print("ray: not installed (pip install -e \".[ray]\"), skipped")
    runners = {k: v for k, v in runners.items() if k == "process" or k in args.runners.split(",")}
    print(f"{args.images} CIFAR-10 JPEGs, {args.model}, {os.cpu_count()} cores, medians of {args.repeats}")
    rows = {}
    for name, cmd in runners.items():
        runs = []
        for r in range(args.repeats):
            cache = work / f"cache-{name}-{r}"
            runs.append(timed([*cmd, "--cache-dir", str(cache)]))
            shutil.rmtree(cache)
        rows[name] = (statistics.median(w for w, _ in runs), statistics.median(e for _, e in runs))
    single = rows["process"][0]
    print(f"{'runner':<10} {'wall s':>7} {'images/s':>9} {'extract s':>10} {'vs process':>11}")
    for name, (wall, inner) in rows.items():
        print(f"{name:<10} {wall:7.1f} {args.images / wall:9.1f} {inner:10.1f} {single / wall:10.2f}x")

    cache = work / "cache-incremental"
    full = timed([*runners["process"], "--cache-dir", str(cache)])
    updates = []
    for r in range(args.repeats):
        make_subset(cifar, max(10, args.images // 100), root, start=4_000 + r * 100)   # unused images
        updates.append(timed([*runners["process"], "--cache-dir", str(cache)]))
    wall, inner = statistics.median(w for w, _ in updates), statistics.median(e for _, e in updates)
    print(f"incremental: +{max(10, args.images // 100)} images (1%): {wall:.1f} s whole process "
          f"({100 * wall / full[0]:.1f}% of the full run's {full[0]:.1f} s), {inner:.2f} s in extract "
          f"({100 * inner / full[1]:.1f}% of {full[1]:.1f} s)")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
