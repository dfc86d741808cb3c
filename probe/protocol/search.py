"""Select on validation, refit on train+val, score once on test.

`search` sees only train and validation rows. `run_probe` reads the test labels after the
winning pipeline has been refit, once.
"""

from __future__ import annotations

import logging
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import log_loss
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from probe.protocol.data import ProbeData
from probe.heads.catalog import PAPER_WD, FAST_REFINE, Head, get_head, make_scaler
from probe.protocol.metrics import classification_metrics
from probe.protocol.options import FitOptions, fit_options
from probe.heads.placement import Memory, place
from probe.output.results import SCHEMA, library_versions
from probe.protocol.rows import concat, is_streamed
from probe.protocol.splits import stratified_subsample
from probe.protocol.threads import default_threads

WARN_SECONDS = 120.0
log = logging.getLogger(__name__)
SMALL = 2_000_000  # below this many feature values, threads cost more than they save


def thread_count(X, n_jobs: int | None = None) -> int | None:
    """BLAS/OpenMP threads for fits on X: n_jobs when given (-1: the libraries' default, None here),
    one for small problems (thread start-up and spinning dominate them), else the usable physical
    cores that other processes leave free (probe.protocol.threads.default_threads)."""
    if n_jobs is not None and n_jobs > 0:
        return n_jobs
    if n_jobs == -1:
        return None
    return 1 if int(np.prod(np.shape(X))) < SMALL else default_threads()


def threads_for(X, n_jobs: int | None = None):
    """A threadpoolctl cap at thread_count(X, n_jobs) (no cap for -1)."""
    n = thread_count(X, n_jobs)
    return nullcontext() if n is None else threadpool_limits(limits=n)


@dataclass
class SearchResult:
    best: dict                 # winning estimator parameters
    grid: list[dict]           # [{"params", "val_top1", "seconds", "converged"}] in the order tried
    seconds: float
    warm: dict | None = None   # fitted state of the winner, to warm-start the refit (path heads)


def silence(fn, *args, **kwargs) -> bool:
    """Call fn, swallowing ConvergenceWarning; True if it converged."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        fn(*args, **kwargs)
    return not any(issubclass(w.category, ConvergenceWarning) for w in caught)


def _bar(items, desc, progress):
    return tqdm(items, desc=desc, unit="fit", leave=False, disable=None if progress else True)


def _grid_search(head, grid, Xtr, ytr, Xva, yva, seed, n_jobs, progress):
    rows = []
    for params in _bar(grid, f"{head.name} grid", progress):
        est = head.build(seed=seed, n_jobs=n_jobs, **params)
        t0 = time.perf_counter()
        converged = silence(est.fit, Xtr, ytr)
        rows.append({"params": params, "val_top1": float(np.mean(est.predict(Xva) == yva)),
                     "seconds": time.perf_counter() - t0, "converged": converged})
    return rows, None


def _knn_search(head, grid, Xtr, ytr, Xva, yva, seed, n_jobs, progress):
    """One neighbour search with the largest k serves every k in the grid."""
    t0 = time.perf_counter()
    est = head.build(seed=seed, n_jobs=n_jobs, **grid[0]).fit(Xtr, ytr)
    sims, idx = est.kneighbors(Xva, max(p["n_neighbors"] for p in grid))
    shared = time.perf_counter() - t0
    rows = []
    for params in grid:
        t1 = time.perf_counter()
        proba = est.proba_from_neighbours(sims, idx, params["n_neighbors"])
        pred = est.classes_[proba.argmax(axis=1)]
        rows.append({"params": params, "val_top1": float(np.mean(pred == yva)),
                     "seconds": time.perf_counter() - t1 + shared / len(grid), "converged": True})
    return rows, None


def _refine_points(best_C: float, tried: set) -> list[dict]:
    """Paper-grid C values within FAST_REFINE steps of the fast winner that were not tried yet."""
    paper_C = sorted(1.0 / PAPER_WD)
    i = int(np.argmin([abs(np.log(c) - np.log(best_C)) for c in paper_C]))
    near = paper_C[max(0, i - FAST_REFINE): i + FAST_REFINE + 1]
    return [{"C": float(c)} for c in near if not any(np.isclose(c, t, rtol=1e-9) for t in tried)]


def _path_search(head, grid, Xtr, ytr, Xva, yva, seed, n_jobs, progress, refine=False):
    """Warm-started regularisation path: one estimator, strong to weak, each fit starting from the last."""
    est = head.build(seed=seed, n_jobs=n_jobs, **grid[0])
    est.set_params(warm_start=True)
    states, rows = {}, []

    def fit_at(params, start=None):
        if start is not None:
            est.coef_, est.intercept_ = (a.copy() for a in start)
        est.set_params(**params)
        t0 = time.perf_counter()
        converged = silence(est.fit, Xtr, ytr)
        proba = est.predict_proba(Xva)
        pred = est.classes_[proba.argmax(axis=1)]
        rows.append({"params": params, "val_top1": float(np.mean(pred == yva)),
                     "val_loss": float(log_loss(yva, proba, labels=est.classes_)),
                     "seconds": time.perf_counter() - t0, "converged": converged})
        states[params["C"]] = (est.coef_.copy(), est.intercept_.copy())

    for params in _bar(grid, f"{head.name} path", progress):
        fit_at(params)
    if refine:
        best_C = _winner(rows)["C"]
        for params in _refine_points(best_C, set(states)):
            stronger = [c for c in states if c < params["C"]]
            fit_at(params, states[max(stronger)] if stronger else None)
    best = _winner(rows)
    return rows, {"coef_": states[best["C"]][0], "intercept_": states[best["C"]][1]}


def winner_index(top1, loss=None) -> int:
    """The one tie rule of every search: highest accuracy; ties go to the lower log-loss where
    recorded, then to the point tried first (the stronger regularisation). Values are compared at
    12 decimals, so a difference in the last bits of a float sum is a tie."""
    top1 = np.round(np.asarray(top1, float), 12)
    loss = np.zeros_like(top1) if loss is None else np.round(np.asarray(loss, float), 12)
    return int(np.lexsort((np.arange(len(top1)), loss, -top1))[0])


def _winner(rows: list[dict]) -> dict:
    loss = [r.get("val_loss", 0.0) for r in rows]
    return rows[winner_index([r["val_top1"] for r in rows], loss)]["params"]


def search(head: Head | str, X_train, y_train, X_val, y_val, *, grid: str = "fast", scale: str | None = None,
           seed: int = 0, n_jobs: int | None = None, progress: bool = True) -> SearchResult:
    """Try every grid point: fit on train, score top-1 on validation. Scaling is fit on train only."""
    head = get_head(head) if isinstance(head, str) else head
    t0 = time.perf_counter()
    scaler = "passthrough" if head.scales_itself else make_scaler(scale or head.default_scale)
    if scaler == "passthrough":
        Xtr, Xva = X_train, X_val
    else:
        Xtr = scaler.fit_transform(X_train).astype(np.float32, copy=False)
        Xva = scaler.transform(X_val).astype(np.float32, copy=False)
    stats = {"n": len(Xtr), "d": Xtr.shape[1], "n_classes": len(np.unique(y_train)),
             "x_var": None if is_streamed(Xtr) else float(np.var(Xtr))}
    points = head.grid(grid, stats)
    if head.seconds_per_fit:
        cores = n_jobs if n_jobs and n_jobs > 0 and head.name == "rf" else 1
        estimate = sum(head.seconds_per_fit(p, stats) for p in points) / cores
        if estimate > WARN_SECONDS:
            log.warning(f"warning: the {head.name} search ({len(points)} fits on {stats['n']} rows) may take "
                   f"~{_human(estimate)}; --max-search-samples N searches on a stratified subsample")
    with threads_for(Xtr, n_jobs):
        if head.name == "knn":
            rows, warm = _knn_search(head, points, Xtr, y_train, Xva, y_val, seed, n_jobs, progress)
        elif head.path:
            rows, warm = _path_search(head, points, Xtr, y_train, Xva, y_val, seed, n_jobs, progress,
                                      refine=grid == "fast")
        else:
            rows, warm = _grid_search(head, points, Xtr, y_train, Xva, y_val, seed, n_jobs, progress)
    return SearchResult(_winner(rows), rows, time.perf_counter() - t0, warm)


def _human(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def refit(head: Head, best: dict, X, y, *, scale=None, seed=0, n_jobs=None, warm: dict | None = None):
    """The winning pipeline fit on train+val (path heads start from the winner's coefficients)."""
    pipe = head.pipeline(scale, seed=seed, n_jobs=n_jobs, **best)
    est = pipe.named_steps["head"]
    if warm:
        est.set_params(warm_start=True)
        for k, v in warm.items():
            setattr(est, k, v.copy())
    with threads_for(X, n_jobs):
        silence(pipe.fit, X, y)
    if warm:
        est.set_params(warm_start=False)
    return pipe


def class_scores(pipe, X, n_classes: int) -> np.ndarray | None:
    """(N, n_classes) scores with columns = class ids: probabilities where the head has them; a class
    absent from the head's training rows scores below every other."""
    if hasattr(pipe, "predict_proba"):
        raw = pipe.predict_proba(X)
    elif hasattr(pipe, "decision_function"):
        raw = pipe.decision_function(X)
    else:
        return None
    present = np.asarray(pipe.classes_)
    if raw.ndim == 1:  # binary decision function: score of the positive class
        raw = np.stack([-raw, raw], axis=1)
    # a class the head never saw ranks below every class it scored, with a finite score
    out = np.repeat(raw.min(axis=1, keepdims=True) - 1.0, n_classes, axis=1)
    out[:, present] = raw
    return out


def unseen_test_classes(y_test, y_fit, classes) -> list[str]:
    """Names of the classes in the test split that no training row has; says so in one warning line."""
    unseen = np.setdiff1d(np.unique(y_test), np.unique(y_fit))
    if not len(unseen):
        return []
    names = [str(classes[i]) if i < len(classes) else str(i) for i in unseen.tolist()]
    n = int(np.isin(y_test, unseen).sum())
    log.warning(f"warning: test class{'es' if len(names) > 1 else ''} {', '.join(names)} ({n} test images) "
                "never occur in train or validation: the head cannot predict them, so they count as errors")
    return names


@dataclass
class ProbeRun:
    result: dict
    pipeline: object


def run_probe(head_name: str | Head, data: ProbeData, options: FitOptions | None = None, *,
              memory: Memory | None = None, **keywords) -> ProbeRun:
    """Search on validation, refit on train+val, score once on test; returns the result dict and head.

    A head name is placed here (probe.heads.placement: solver, device, streaming); a Head is used as given.
    `keywords` change single fields of `options` (FitOptions).
    """
    o = fit_options(options, **keywords)
    grid, seed, n_jobs = o.grid, o.seed, o.n_jobs
    streamed = is_streamed(data.X_train)
    head = place(head_name, solver=o.solver, device=o.device, scale=o.scale, streamed=streamed, memory=memory) \
        if isinstance(head_name, str) else head_name
    scale = o.scale or head.default_scale
    Xs, ys = data.X_train, data.y_train
    validation = data.validation
    if o.max_search_samples and len(ys) > o.max_search_samples:
        index = data.index_train if data.index_train is not None else np.arange(len(ys))
        keep = stratified_subsample(index, ys, o.max_search_samples, seed=seed)
        Xs, ys = Xs[keep], ys[keep]
        validation += f"; search fit on a stratified subsample of {len(keep)} of {len(data.y_train)} train rows"
    found = search(head, Xs, ys, data.X_val, data.y_val, grid=grid, scale=scale, seed=seed, n_jobs=n_jobs,
                   progress=o.progress)
    X_fit = concat(data.X_train, data.X_val)
    y_fit = np.concatenate([data.y_train, data.y_val])
    if head.seconds_per_fit:
        stats = {"n": len(y_fit), "d": X_fit.shape[1]}
        estimate = head.seconds_per_fit(found.best, stats)
        if estimate > WARN_SECONDS:
            log.warning(f"warning: refitting {head.name} on {len(y_fit)} train+val rows may take ~{_human(estimate)}")
    t0 = time.perf_counter()
    pipe = refit(head, found.best, X_fit, y_fit, scale=scale, seed=seed, n_jobs=n_jobs, warm=found.warm)
    fit_seconds = time.perf_counter() - t0
    # The test labels are read here, once, after the head is final.
    t0 = time.perf_counter()
    pred = pipe.predict(data.X_test)
    scores = class_scores(pipe, data.X_test, len(data.classes)) if len(data.classes) > 5 else None
    predict_seconds = time.perf_counter() - t0
    metrics = classification_metrics(data.y_test, pred, scores, classes=data.classes)
    unseen = unseen_test_classes(data.y_test, y_fit, data.classes)
    result = {
        "schema": SCHEMA, "kind": "probe", "head": head.name, "description": head.description,
        "solver": head.solver, "device": head.device, "streamed": streamed,
        "dataset": data.dataset, "model": data.model, "identity": data.identity.to_dict(),
        "precision": data.identity.precision, "dtype": data.identity.dtype,
        "layer": data.layer, "metrics": metrics,
        "hyperparameters": {**found.best, "scale": scale}, "grid_name": grid,
        "grid": [{"params": r["params"], "val_top1": r["val_top1"],
                  **({"val_loss": round(r["val_loss"], 6)} if "val_loss" in r else {}),
                  "seconds": round(r["seconds"], 4), "converged": r["converged"]} for r in found.grid],
        "timing": {"search_seconds": round(found.seconds, 4), "fit_seconds": round(fit_seconds, 4),
                   "predict_seconds": round(predict_seconds, 4)},
        "sizes": {**data.sizes, "search_train": int(len(ys))}, "validation": validation,
        "test_split": data.test_split, "test": data.test, "test_classes_not_in_train": unseen,
        "classes": data.classes, "sources": data.sources,
        "provenance": data.provenance, "versions": library_versions(), "seed": seed,
        "threads": thread_count(Xs, n_jobs), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return ProbeRun(result, pipe)
