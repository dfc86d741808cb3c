"""Logistic-regression sweep speed and the every-head table, on real cached embeddings.

1. The logistic-regression sweep, three ways in one process, on the same train / validation / test rows:

     fast    featprobe `--grid fast`: warm-started path over every decade of the paper grid, refined around
             the winner (probe.protocol.search.run_probe, as `python -m probe --head logreg --grid fast` runs it)
     paper   featprobe `--grid paper`: the warm-started path over all 45 values
     naive   a plain scikit-learn sweep: a fresh make_pipeline(StandardScaler(), LogisticRegression(C=c))
             fit per C (no warm start) over the same 45 values C = 1/wd, wd = logspace(-6, 5, 45), each
             scored on the validation rows; the best C (first on ties, strongest regularisation first) is
             refit on train+val and scored once on test. Same solver, max_iter and tol as featprobe's head.

   All three run under the same thread cap (probe's own --n-jobs mechanism). Seconds are medians of
   --repeats runs, whose order rotates from repeat to repeat.

2. Every head (linear, logreg, svm, svm-rbf, rf, knn) through probe.api.evaluate (what `python -m probe
   --head NAME` runs) with the fast grids, read back from the result JSON files: test top-1, balanced
   accuracy, fit seconds (search + refit). svm-rbf and rf search on a stratified subsample
   (--max-search-samples; 0 = all train rows).

The cache files of an image folder DIR live under cache/<DIR's name>-<6 hex hash>/<model>/, as
`python -m extract --model efficientnet_lite0 --data imagefolder --root DIR` writes them:

    python bench/probe_sweep.py --train cache/cifar10-sub-*/efficientnet_lite0/train.h5 \\
        --test cache/cifar10-sub-*/efficientnet_lite0/test.h5 --repeats 3 --n-jobs 1
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info

from extract import load_features
from extract.core.errors import UserError
from probe.api import evaluate
from probe.protocol.data import load_probe_data, selection_from_paths
from probe.heads.catalog import PAPER_WD, get_head, list_heads
from probe.protocol.search import threads_for, run_probe

SUBSAMPLED_HEADS = ("svm-rbf", "rf")


def thread_setting(X, n_jobs) -> str:
    """The BLAS / OpenMP thread counts in force under probe's cap for an array like X."""
    with threads_for(X, n_jobs):
        counts = sorted({(i["user_api"], i["num_threads"]) for i in threadpool_info()})
    return ", ".join(f"{api} {n}" for api, n in counts) or "no thread pools found"


def naive_sweep(data, n_jobs) -> dict:
    """A fresh scaler + LogisticRegression per C, selected on validation, refit on train+val, scored on test."""
    ref = get_head("logreg").build()  # the solver settings featprobe uses, so both solve the same problem
    solver = {"solver": ref.solver, "max_iter": ref.max_iter, "tol": ref.tol}
    grid = sorted(float(1.0 / wd) for wd in PAPER_WD)  # strongest regularisation first, as the path goes
    t0 = time.perf_counter()
    scores, unconverged = [], 0
    with threads_for(data.X_train, n_jobs), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for C in grid:
            pipe = make_pipeline(StandardScaler(), LogisticRegression(C=C, **solver))
            pipe.fit(data.X_train, data.y_train)
            scores.append(float(np.mean(pipe.predict(data.X_val) == data.y_val)))
        unconverged = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    search_s = time.perf_counter() - t0
    best = int(np.argmax(scores))  # first maximum
    X_fit = np.concatenate([data.X_train, data.X_val])
    y_fit = np.concatenate([data.y_train, data.y_val])
    t1 = time.perf_counter()
    with threads_for(X_fit, n_jobs), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=grid[best], **solver)).fit(X_fit, y_fit)
    fit_s = time.perf_counter() - t1
    top1 = float(np.mean(pipe.predict(data.X_test) == data.y_test))
    return {"search_s": search_s, "refit_s": fit_s, "total_s": time.perf_counter() - t0, "C": grid[best],
            "val_top1": scores[best], "test_top1": top1, "fits": len(grid), "unconverged": unconverged}


def featprobe_sweep(data, grid: str, n_jobs) -> dict:
    """`python -m probe --head logreg --grid GRID` minus the printing and file writing."""
    t0 = time.perf_counter()
    run = run_probe("logreg", data, grid=grid, n_jobs=n_jobs, progress=False)
    total = time.perf_counter() - t0
    r = run.result
    rows = r["grid"]
    return {"search_s": r["timing"]["search_seconds"], "refit_s": r["timing"]["fit_seconds"], "total_s": total,
            "C": r["hyperparameters"]["C"], "val_top1": max(g["val_top1"] for g in rows),
            "test_top1": r["metrics"]["top1"], "fits": len(rows),
            "unconverged": sum(not g["converged"] for g in rows)}


def sweep_table(runs: dict[str, list[dict]]) -> list[str]:
    head = (f"{'sweep':<7} {'fits':>4} {'search s':>9} {'refit s':>8} {'total s':>8}  {'selected C':>10}  "
            f"{'val top-1':>9}  {'test top-1':>10}  not converged")
    lines = [head, "-" * len(head)]
    for name, reps in runs.items():
        first = reps[0]
        med = {k: statistics.median(r[k] for r in reps) for k in ("search_s", "refit_s", "total_s")}
        lines.append(f"{name:<7} {first['fits']:>4} {med['search_s']:>9.2f} {med['refit_s']:>8.2f} "
                     f"{med['total_s']:>8.2f}  {first['C']:>10.4g}  {100 * first['val_top1']:>8.2f}%  "
                     f"{100 * first['test_top1']:>9.2f}%  {first['unconverged']}")
        drift = {(r["C"], r["test_top1"]) for r in reps}
        if len(drift) > 1:
            lines.append(f"        note: the selection differed between repeats: {sorted(drift)}")
    return lines


def ratio_line(label: str, slow: list[dict], quick: list[dict], key: str) -> str:
    ratio = statistics.median(r[key] for r in slow) / statistics.median(r[key] for r in quick)
    per = [a[key] / b[key] for a, b in zip(slow, quick)]
    return (f"{label}: {ratio:.2f}x  (per repeat {', '.join(f'{p:.2f}' for p in per)})")


def logreg_benchmark(data, repeats: int, n_jobs) -> list[str]:
    runs = {"naive": [], "paper": [], "fast": []}
    order = list(runs)
    for rep in range(repeats):
        for name in order[rep % 3:] + order[:rep % 3]:
            runs[name].append(naive_sweep(data, n_jobs) if name == "naive" else featprobe_sweep(data, name, n_jobs))
        print(f"  repeat {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]['total_s']:.1f} s" for k, v in runs.items()),
              flush=True)
    lines = sweep_table(runs)
    naive, paper, fast = runs["naive"], runs["paper"], runs["fast"]
    lines.append("")
    lines.append(ratio_line("speed-up naive / paper (search + refit + test)", naive, paper, "total_s")
                 + "   target >= 3x")
    lines.append(ratio_line("speed-up naive / fast  (search + refit + test)", naive, fast, "total_s"))
    lines.append(ratio_line("speed-up naive / paper (search only)         ", naive, paper, "search_s"))
    lines.append(ratio_line("speed-up naive / fast  (search only)         ", naive, fast, "search_s"))
    d_paper = 100 * (paper[0]["test_top1"] - naive[0]["test_top1"])
    d_fast = 100 * (fast[0]["test_top1"] - paper[0]["test_top1"])
    lines.append(f"test top-1 paper - naive: {d_paper:+.2f} points   target within +-0.2: "
                 f"{'met' if abs(d_paper) <= 0.2 + 1e-9 else 'NOT met'}")
    lines.append(f"test top-1 fast - paper:  {d_fast:+.2f} points   target within +-0.3: "
                 f"{'met' if abs(d_fast) <= 0.3 + 1e-9 else 'NOT met'}")
    return lines


class _Warnings(logging.Handler):
    """Collects the warning lines probe logs during one evaluate() call."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def all_heads(train: str, test: str, n_jobs, max_search: int) -> list[str]:
    """Each head through probe.api.evaluate into a scratch results folder; the table is read from the JSONs."""
    lines, notes = [], []
    logger = logging.getLogger("probe")
    with tempfile.TemporaryDirectory(prefix="probe-sweep-") as tmp:
        for name in list_heads():
            subsample = max_search if name in SUBSAMPLED_HEADS and max_search else None
            caught = _Warnings()
            logger.addHandler(caught)
            t0 = time.perf_counter()
            try:
                evaluate(name, features=train, test_features=test, results_dir=tmp, n_jobs=n_jobs,
                         max_search_samples=subsample, save=False, progress=False)
            except UserError as e:
                raise SystemExit(f"probe head {name} failed: {e}") from None
            finally:
                logger.removeHandler(caught)
            wall = time.perf_counter() - t0
            notes += [f"  {name}: {line}" for line in caught.lines if line.startswith("warning")]
            print(f"  {name}: done in {wall:.1f} s", flush=True)
        results = [json.loads(p.read_text()) for p in Path(tmp).glob("**/*.json")]
    results.sort(key=lambda r: -r["metrics"]["top1"])
    head = (f"{'head':<8} {'test top-1':>10} {'balanced':>9} {'macro-F1':>9} {'search s':>9} {'refit s':>8} "
            f"{'fit s':>7}  {'search rows':>11}  chosen")
    lines += [head, "-" * len(head)]
    for r in results:
        m, t = r["metrics"], r["timing"]
        hp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["hyperparameters"].items())
        lines.append(f"{r['head']:<8} {100 * m['top1']:>9.2f}% {100 * m['balanced_accuracy']:>8.2f}% "
                     f"{100 * m['macro_f1']:>8.2f}% {t['search_seconds']:>9.2f} {t['fit_seconds']:>8.2f} "
                     f"{t['search_seconds'] + t['fit_seconds']:>7.2f}  {r['sizes']['search_train']:>11}  {hp}")
    lines.append("fit s = search + refit on train+val (probe's fit_s); predict time not included.")
    if max_search:
        lines.append(f"{' and '.join(SUBSAMPLED_HEADS)} searched on a stratified subsample of {max_search} train rows "
                     "(--max-search-samples); their refit uses every train+val row.")
    if notes:
        lines.append("probe's warnings:")
        lines += notes
    return lines


def describe(train: str, test: str, data) -> list[str]:
    X, _, meta = load_features(train)
    identity = meta["identity"]
    root = identity.data.root or "?"
    weights = meta["provenance"].get("weights") or "default"
    counts = np.bincount(np.concatenate([data.y_train, data.y_val]), minlength=len(data.classes))
    per_class = f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"
    return [
        f"data: {data.sizes['train'] + data.sizes['val']} train / {data.sizes['test']} test images, "
        f"{len(data.classes)} classes ({per_class} train per class), {X.shape[1]}-dim '{meta['layer']}' "
        f"{identity.dtype} features",
        f"      {identity.model} ({weights} weights) embeddings of the image folder "
        f"{root}, cached by `python -m extract --model {identity.model} --data imagefolder --root {root}`",
        f"      train: {train}",
        f"      test:  {test}",
        f"split: {data.sizes['train']} train / {data.sizes['val']} validation ({data.validation}) / "
        f"{data.sizes['test']} test; selection on validation only, refit on train+val, test scored once",
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--train", required=True, help="train split cache (.h5)")
    p.add_argument("--test", required=True, help="test split cache (.h5)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each sweep (medians reported)")
    p.add_argument("--n-jobs", type=int, default=1,
                   help="probe's --n-jobs: BLAS/OpenMP threads (and rf processes); 0 = probe's default")
    p.add_argument("--max-search-samples", type=int, default=3000,
                   help="search svm-rbf and rf on this many train rows (0 = all)")
    p.add_argument("--skip-all", action="store_true", help="only the logistic-regression sweep")
    args = p.parse_args(argv)
    n_jobs = args.n_jobs or None
    start = time.perf_counter()
    data = load_probe_data(selection_from_paths(args.train, args.test))
    print("\n".join(describe(args.train, args.test, data)))
    print(f"threads: --n-jobs {args.n_jobs or 'unset'} -> {thread_setting(data.X_train, n_jobs)} "
          f"(the same cap for every sweep); scikit-learn {sklearn.__version__}, numpy {np.__version__}, "
          f"python {sys.version.split()[0]}")
    print(f"\n== logistic-regression sweep, {args.repeats} repeat(s), medians ==", flush=True)
    lines = logreg_benchmark(data, args.repeats, n_jobs)
    print("\n".join(lines), flush=True)
    if not args.skip_all:
        print("\n== every head (python -m probe --head NAME, fast grids) ==", flush=True)
        print("\n".join(all_heads(args.train, args.test, n_jobs, args.max_search_samples)))
    print(f"\ntotal run time {(time.perf_counter() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
