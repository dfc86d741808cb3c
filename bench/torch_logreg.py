"""logreg on torch against scikit-learn, and the torch solver's time per C on a large synthetic problem.

1. Both solvers through the probe protocol (`--grid fast`: warm-started path, refined around the winner,
   refit on train+val, scored once on test), on the same rows and under the same thread cap: selected C,
   test top-1, seconds, and the time ratio. Features: the cached EfficientNet-Lite0 features of the
   CIFAR-10 JPEG subset (README, "Probe") when a cache exists, else synthetic ones (--compare-size):

       python bench/torch_logreg.py                                  newest cache/cifar10-sub-*/efficientnet_lite0
       python bench/torch_logreg.py --train T.h5 --test T.h5 --n-jobs 1

2. --synthetic N D C: the torch solver alone on N rows (90% fit, 10% validation) of D dims and C classes,
   warm-started along a C path from strong to weak regularisation; seconds, L-BFGS iterations and
   validation top-1 per C. The ImageNet-sized problem on a GPU (about 11 GB of features):

       python bench/torch_logreg.py --synthetic 1281167 2048 1000 --device cuda --path 1e-4,1e-3,1e-2,1e-1
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from probe.protocol.data import load_probe_data, selection_from_paths  # noqa: E402
from probe.heads.device import resolve_device  # noqa: E402
from probe.heads.placement import place  # noqa: E402
from probe.protocol.search import threads_for, refit, search  # noqa: E402
from probe.heads.torch_logreg import TorchLogisticRegression  # noqa: E402

CIFAR_SUBSET = "cache/cifar10-sub-*/efficientnet_lite0/train.h5"


def synthetic(n: int, d: int, classes: int, seed: int = 0):
    """Gaussian classes in d dims, centres about 3 noise standard deviations apart; built in blocks."""
    rng = np.random.default_rng(seed)
    centres = (rng.standard_normal((classes, d)) * 3.0 / np.sqrt(2 * d)).astype(np.float32)
    y = rng.integers(0, classes, n)
    X = np.empty((n, d), np.float32)
    for start in range(0, n, 65536):
        stop = min(n, start + 65536)
        X[start:stop] = centres[y[start:stop]] + rng.standard_normal((stop - start, d), dtype=np.float32)
    return X, y


def warm_up(device) -> None:
    """One tiny fit, so that torch's one-off start-up (about a second here) is not timed."""
    X, y = synthetic(64, 8, 2)
    TorchLogisticRegression(device=str(device)).fit(X, y)


def compare_data(args):
    """(train, val, test) arrays and a description: a cache when given or found, else synthetic."""
    train = args.train or next(iter(sorted(glob.glob(CIFAR_SUBSET), key=os.path.getmtime, reverse=True)), None)
    if train:
        data = load_probe_data(selection_from_paths(train, args.test), seed=0)
        return ((data.X_train, data.y_train), (data.X_val, data.y_val), (data.X_test, data.y_test),
                f"{train}: {data.sizes}, {data.X_train.shape[1]} dims")
    n, d, c = args.compare_size
    X, y = synthetic(n, d, c)
    a, b = int(0.6 * n), int(0.8 * n)
    return (X[:a], y[:a]), (X[a:b], y[a:b]), (X[b:], y[b:]), f"synthetic (no cache at {CIFAR_SUBSET}): " \
        f"{a} train, {b - a} validation, {n - b} test, {d} dims, {c} classes"


def run_compare(args) -> None:
    (Xtr, ytr), (Xva, yva), (Xte, yte), what = compare_data(args)
    print(what)
    X_fit, y_fit = np.concatenate([Xtr, Xva]), np.concatenate([ytr, yva])
    warm_up(resolve_device(args.device))
    rows = {}
    for solver in ("sklearn", "torch"):
        head = place("logreg", solver=solver, device=args.device)
        t0 = time.perf_counter()
        found = search(head, Xtr, ytr, Xva, yva, n_jobs=args.n_jobs, progress=False)
        t1 = time.perf_counter()
        pipe = refit(head, found.best, X_fit, y_fit, n_jobs=args.n_jobs, warm=found.warm)
        t2 = time.perf_counter()
        with threads_for(Xte, args.n_jobs):
            top1 = 100 * float(np.mean(pipe.predict(Xte) == yte))
        rows[solver] = {"where": f"{solver} ({head.device})", "fits": len(found.grid), "C": found.best["C"],
                        "top1": top1, "search": t1 - t0, "refit": t2 - t1}
    print("| solver | fits | selected C | test top-1 | search s | refit s | total s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows.values():
        print(f"| {r['where']} | {r['fits']} | {r['C']:.4g} | {r['top1']:.2f}% | {r['search']:.2f} | "
              f"{r['refit']:.2f} | {r['search'] + r['refit']:.2f} |")
    sk, th = rows["sklearn"], rows["torch"]
    print(f"torch / sklearn time = {(th['search'] + th['refit']) / (sk['search'] + sk['refit']):.2f}x; "
          f"test top-1 torch - sklearn {th['top1'] - sk['top1']:+.2f} points; same C: {th['C'] == sk['C']}")


def run_path(args) -> None:
    n, d, c = args.synthetic
    device = resolve_device(args.device)
    t0 = time.perf_counter()
    X, y = synthetic(n, d, c)
    cut = int(0.9 * n)
    print(f"synthetic {cut} fit + {n - cut} validation rows, {d} dims, {c} classes ({X.nbytes / 1e9:.1f} GB, "
          f"made in {time.perf_counter() - t0:.1f} s); torch L-BFGS on {device}")
    warm_up(device)
    est = TorchLogisticRegression(device=str(device), warm_start=True)
    print("| C | seconds | L-BFGS iterations | validation top-1 |")
    print("|---|---|---|---|")
    total = 0.0
    for C in sorted(float(v) for v in args.path.split(",")):
        est.set_params(C=C)
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught, threads_for(X, args.n_jobs):
            warnings.simplefilter("always", ConvergenceWarning)
            est.fit(X[:cut], y[:cut])
        seconds = time.perf_counter() - t0
        total += seconds
        top1 = 100 * float(np.mean(est.predict(X[cut:]) == y[cut:]))
        note = " (not converged)" if caught else ""
        print(f"| {C:.4g} | {seconds:.2f} | {est.n_iter_[0]}{note} | {top1:.2f}% |")
    print(f"path total {total:.1f} s")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--train", help="train cache file (default: the newest CIFAR-10 subset cache, else synthetic)")
    p.add_argument("--test", help="test cache file (default: the train file's sibling)")
    p.add_argument("--compare-size", nargs=3, type=int, default=(10000, 1280, 10), metavar=("N", "D", "C"),
                   help="synthetic rows, dims and classes when no cache is found (default: 10000 1280 10)")
    p.add_argument("--synthetic", nargs=3, type=int, metavar=("N", "D", "C"),
                   help="time the torch solver per C on a synthetic problem of this size instead")
    p.add_argument("--path", default="1e-4,1e-3,1e-2,1e-1,1", help="C values of --synthetic's path")
    p.add_argument("--device", default="auto", help="torch device: auto, cpu, cuda")
    p.add_argument("--n-jobs", type=int, default=None, help="BLAS/OpenMP threads for both solvers")
    args = p.parse_args(argv)
    run_path(args) if args.synthetic else run_compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
