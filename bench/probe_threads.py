"""`python -m probe --head logreg` wall time by --n-jobs, on a quiet machine and beside a process
that keeps one core busy (`python -c 'while True: pass'`).

Each run is a fresh process, as a user runs it; the threads probe chose are read from the result
JSON (`threads`). Prints one table and the machine (lscpu model, cores, load average).

    python bench/probe_threads.py --train cache/cifar10-sub-*/efficientnet_lite0/train.h5 \\
        --test cache/cifar10-sub-*/efficientnet_lite0/test.h5 --settings default,1,2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def one_run(train: str, test: str, setting: str) -> tuple[float, int | None, float]:
    """(wall seconds, threads probe used, search + refit seconds) of one probe process."""
    with tempfile.TemporaryDirectory() as results:
        cmd = [sys.executable, "-m", "probe", "--head", "logreg", "--features", train, "--test-features", test,
               "--no-save", "--no-progress", "--results-dir", results]
        if setting != "default":
            cmd += ["--n-jobs", setting]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(proc.stderr)
        result = json.loads(next(Path(results).glob("**/logreg.json")).read_text())
    timing = result["timing"]
    return wall, result.get("threads"), timing["search_seconds"] + timing["fit_seconds"]


def burner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--train", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--settings", default="default,1,2", help="--n-jobs values; default = not given")
    p.add_argument("--repeats", type=int, default=2, help="runs per cell (medians reported)")
    p.add_argument("--conditions", default="quiet,busy", help="quiet (no extra process), busy (one core burnt)")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args(argv)
    settings = args.settings.split(",")
    print(f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {cpu_model()}, {os.cpu_count()} logical CPUs; "
          f"{args.repeats} run(s) per cell, medians")
    rows = []
    for condition in args.conditions.split(","):
        hog = burner() if condition == "busy" else None
        try:
            time.sleep(1.0 if hog else 0.0)
            load = os.getloadavg()[0]
            for setting in settings:
                runs = [one_run(args.train, args.test, setting) for _ in range(args.repeats)]
                row = {"condition": condition, "n_jobs": setting, "threads": runs[0][1],
                       "wall_s": round(statistics.median(r[0] for r in runs), 2),
                       "fit_s": round(statistics.median(r[2] for r in runs), 2),
                       "load_before": round(load, 2), "walls": [round(r[0], 2) for r in runs]}
                rows.append(row)
                print(f"{condition:>5}  --n-jobs {setting:<7}  threads {row['threads']!s:>4}  "
                      f"wall {row['wall_s']:7.2f} s  search+refit {row['fit_s']:7.2f} s  "
                      f"(runs {row['walls']}, 1-min load {row['load_before']})", flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
