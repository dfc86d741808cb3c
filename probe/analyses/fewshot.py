"""Few-shot curves: test top-1 of a head fit on k labelled images per class, for several k.

For each k and each of `seeds` draws, k rows per class are drawn from the train+val rows; the
head's hyperparameters are chosen by stratified cross-validation inside those k-shot rows, never
on test; the head is fit on the k-shot rows and scored once on the test split. 'all' (k = None)
is the normal protocol (`probe.protocol.search.run_probe`: select on validation, refit on train+val), so
the curve ends at the full-data number.

Draws. Draw d of seed s ranks the train+val rows by a uniform number from
`numpy.random.default_rng([s, d])` and takes the first k of each class. The ranking does not
depend on k, so within a draw the 1-shot rows are among the 2-shot rows, and so on: the curve of
one draw shows what more labels buy, not a new sample's luck.

Selection. k >= 2: `StratifiedKFold(n_splits=min(k, 5), shuffle=True)` over the k-shot rows,
every point of the head's grid (`Head.grid`, without the fast grid's refinement step) scored by
mean held-out-fold top-1; ties go to the lower held-out log-loss for path heads (logreg), as in
`probe.protocol.search`, then to the point tried first. k = 1 (or any class with a single row): no class
could be held out, so the head's builder defaults are used, which are scikit-learn's own:
logreg C = 1.0 (wd = 1, inside the paper grid), linear alpha = 1.0, svm C = 1.0, svm-rbf C = 1.0
with gamma = 'scale', rf 100 trees with sqrt features, knn k = 20 (DINO's default).

Intervals. The 95% interval of the mean over draws is mean +- t(0.975, n-1) * s / sqrt(n) with s
the sample standard deviation: with few draws (5) the normal 1.96 would be too narrow. Ericsson
et al. 2021 (`ssl-transfer/few_shot.py`) report few-shot accuracy as mean +- 1.96 * std / sqrt(600)
over 600 five-way episodes of a prototype classifier; here the head is the one asked for, every
class of the dataset is used (all-way), and the draws are few, hence the t quantile.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from tqdm.auto import tqdm

from extract.core.atomic import write_errors, write_text_atomic
from extract.core.errors import UserError

from probe.protocol.data import ProbeData
from probe.heads.catalog import Head, get_head, make_scaler
from probe.protocol.options import FitOptions, fit_options
from probe.protocol.search import run_probe, silence, threads_for, winner_index
from probe.output.results import _safe, library_versions, result_dir

SCHEMA = "featprobe.fewshot/1"
MAX_FOLDS = 5
CONFIDENCE = 0.95
log = logging.getLogger(__name__)


# --- shots ------------------------------------------------------------------------------------

def parse_shots(text) -> list[int | None]:
    """'1,2,5,10,20,all' -> [1, 2, 5, 10, 20, None]: ascending, duplicates dropped, None (all) last."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = set()
    for item in items:
        word = str(item).strip().lower() if item is not None else "all"
        if word == "all":
            out.add(None)
            continue
        try:
            k = int(word)
        except ValueError:
            raise UserError(f"--shots takes positive integers and 'all', comma-separated; got {item!r}") from None
        if k < 1:
            raise UserError(f"--shots takes positive integers and 'all'; got {item!r}")
        out.add(k)
    if not out:
        raise UserError("--shots is empty; e.g. --shots 1,2,5,10,20,all")
    return sorted(k for k in out if k is not None) + ([None] if None in out else [])


def shot_label(k: int | None) -> str:
    return "all" if k is None else str(k)


def kshot_rows(y, k: int, *, seed: int = 0, draw: int = 0) -> np.ndarray:
    """Sorted positions of k rows of each class of y (all rows of a class with fewer), for draw `draw`."""
    y = np.asarray(y)
    order = np.argsort(np.random.default_rng([seed, draw]).random(len(y)), kind="stable")
    grouped = order[np.argsort(y[order], kind="stable")]      # by class, in draw order within a class
    classes, start = np.unique(y[grouped], return_index=True)
    rank = np.arange(len(y)) - np.repeat(start, np.diff(np.append(start, len(y))))
    return np.sort(grouped[rank < k])


# --- intervals --------------------------------------------------------------------------------

def mean_ci(values, confidence: float = CONFIDENCE) -> dict:
    """Mean, sample std and the t-interval of the mean; interval None with fewer than two values."""
    v = np.asarray(values, dtype=float)
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "std": None, "ci95": None, "ci95_halfwidth": None}
    std = 0.0 if np.all(v == v[0]) else float(v.std(ddof=1))  # agreeing draws: exactly 0, not rounding noise
    half = float(stats.t.ppf(0.5 + confidence / 2, len(v) - 1) * std / np.sqrt(len(v)))
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "ci95_halfwidth": half}


# --- one k-shot draw ----------------------------------------------------------------------------

def _grid_points(head: Head, grid: str, scale: str, X, y) -> list[dict]:
    """The head's grid for these rows (stats of the scaled rows, as protocol.search computes them)."""
    scaler = make_scaler(scale)
    Xs = X if scaler == "passthrough" else scaler.fit_transform(X)
    return head.grid(grid, {"n": len(X), "d": X.shape[1], "n_classes": len(np.unique(y)),
                            "x_var": float(np.var(Xs))})


def _best_index(cv: dict) -> int:
    """The search's tie rule (probe.protocol.search.winner_index) over the CV means."""
    loss = -np.asarray(cv["mean_test_loss"]) if "mean_test_loss" in cv else None   # sklearn scores neg log-loss
    return winner_index(cv["mean_test_top1"], loss)


def cv_select(head: Head, X, y, *, grid="fast", scale=None, seed=0, cv_seed=0, n_jobs=None) -> dict:
    """Choose the head's parameters by stratified CV inside (X, y); builder defaults with one row a class.

    Returns {"params", "selection", "cv_top1" (None without CV), "n_splits"}.
    """
    scale = scale or head.default_scale
    n_splits = min(int(np.bincount(np.unique(y, return_inverse=True)[1]).min()), MAX_FOLDS)
    if n_splits < 2:
        return {"params": None, "selection": "builder defaults (one row of a class: nothing to hold out)",
                "cv_top1": None, "n_splits": 0}
    points = _grid_points(head, grid, scale, X, y)
    scoring = {"top1": "accuracy", **({"loss": "neg_log_loss"} if head.path else {})}
    search = GridSearchCV(head.pipeline(scale, seed=seed, n_jobs=n_jobs),
                          [{f"head__{k}": [v] for k, v in p.items()} for p in points],
                          scoring=scoring, refit=False, error_score="raise",
                          cv=StratifiedKFold(n_splits, shuffle=True, random_state=cv_seed))
    with warnings.catch_warnings(), threads_for(X, n_jobs):
        warnings.simplefilter("ignore", ConvergenceWarning)
        search.fit(X, y)
    best = _best_index(search.cv_results_)
    return {"params": points[best], "selection": f"stratified {n_splits}-fold CV in the k-shot rows",
            "cv_top1": float(search.cv_results_["mean_test_top1"][best]), "n_splits": n_splits}


def _grid_keys(head: Head, grid: str) -> list[str]:
    """The parameter names the head's grid searches (UserError for an unknown grid name)."""
    return list(head.grid(grid, {"n": 2, "d": 1, "n_classes": 2, "x_var": 1.0})[0])


def _chosen(pipe, head: Head, params: dict | None, grid: str) -> dict:
    """The parameters the fitted head used (its builder defaults when none were chosen)."""
    if params is not None:
        return dict(params)
    used = pipe.named_steps["head"].get_params()
    return {k: used[k] for k in _grid_keys(head, grid)}


def kshot_draw(head: Head, data: ProbeData, X_pool, y_pool, k: int, draw: int, *, grid="fast", scale=None,
               seed=0, n_jobs=None) -> dict:
    """One draw: pick k rows a class, select by CV among them, fit on them, score once on test."""
    scale = scale or head.default_scale
    t0 = time.perf_counter()
    rows = kshot_rows(y_pool, k, seed=seed, draw=draw)
    X, y = X_pool[rows], y_pool[rows]
    cv_seed = int(np.random.SeedSequence([seed, draw, k]).generate_state(1)[0])
    picked = cv_select(head, X, y, grid=grid, scale=scale, seed=seed, cv_seed=cv_seed, n_jobs=n_jobs)
    pipe = head.pipeline(scale, seed=seed, n_jobs=n_jobs, **(picked["params"] or {}))
    with threads_for(X, n_jobs):
        converged = silence(pipe.fit, X, y)
    # The test labels are read here, once, after the head is final.
    accuracy = float(np.mean(pipe.predict(data.X_test) == data.y_test))
    return {"accuracy": accuracy, "hyperparameters": {**_chosen(pipe, head, picked["params"], grid), "scale": scale},
            "selection": picked["selection"], "cv_top1": picked["cv_top1"], "n_train": int(len(rows)),
            "converged": converged, "seconds": time.perf_counter() - t0}


# --- the curve ----------------------------------------------------------------------------------

def _pool(data: ProbeData):
    return np.concatenate([data.X_train, data.X_val]), np.concatenate([data.y_train, data.y_val])


def _kshot_point(head, data, X_pool, y_pool, k, seeds, bar, **kw) -> dict:
    short = [data.classes[c] if c < len(data.classes) else str(c)
             for c, n in enumerate(np.bincount(y_pool)) if 0 < n < k]
    if short:
        log.warning(f"warning: {len(short)} classes have fewer than {k} train+val rows "
                    f"({', '.join(short[:5])}{', ...' if len(short) > 5 else ''}); they keep all of them")
    draws = []
    for draw in range(seeds):
        draws.append(kshot_draw(head, data, X_pool, y_pool, k, draw, **kw))
        bar.update(1)
    return {"k": k, "label": str(k), **mean_ci([d["accuracy"] for d in draws]),
            "accuracies": [d["accuracy"] for d in draws],
            "hyperparameters": [d["hyperparameters"] for d in draws],
            "selection": [d["selection"] for d in draws], "cv_top1": [d["cv_top1"] for d in draws],
            "n_train": [d["n_train"] for d in draws], "converged": [d["converged"] for d in draws],
            "short_classes": short, "seconds": round(sum(d["seconds"] for d in draws), 4)}


def _all_point(head_name: str, data: ProbeData, options: FitOptions) -> dict:
    t0 = time.perf_counter()
    run = run_probe(head_name, data, options).result
    top1 = run["metrics"]["top1"]
    return {"k": None, "label": "all", **mean_ci([top1]), "accuracies": [top1],
            "hyperparameters": [run["hyperparameters"]], "selection": [run["validation"]], "cv_top1": [None],
            "n_train": [len(data.y_train) + len(data.y_val)], "converged": [None], "short_classes": [],
            "seconds": round(time.perf_counter() - t0, 4)}


def _check(shots, seeds: int, seed: int) -> list[int | None]:
    ks = parse_shots(shots) if isinstance(shots, str) else parse_shots([shot_label(k) for k in shots])
    if int(seeds) < 1:
        raise UserError(f"--seeds must be at least 1; got {seeds}")
    if int(seed) < 0:
        raise UserError(f"--seed must be >= 0 for few-shot draws; got {seed}")
    return ks


def fewshot(head_name: str, data: ProbeData, shots="1,2,5,10,20,all", seeds: int = 5,
            options: FitOptions | None = None, **keywords) -> dict:
    """Test top-1 against k labelled images per class, `seeds` draws per k; see the module docstring.

    Every point, `all` included, is fit by scikit-learn on the CPU (k-shot rows are small), so the
    curve is one solver's: --solver torch or a --device other than auto/cpu is refused in one line.
    `keywords` change single fields of `options` (FitOptions).
    """
    o = fit_options(options, **keywords)
    if o.solver == "torch" or o.device not in ("auto", "cpu"):
        raise UserError("few-shot curves fit scikit-learn heads on the CPU: drop --solver torch / --device "
                        f"{o.device}")
    o = o.replace(device="cpu")   # with solver auto on the CPU and in-memory rows: scikit-learn
    grid, seed, n_jobs, progress, scale = o.grid, o.seed, o.n_jobs, o.progress, o.scale
    head = get_head(head_name)
    ks = _check(shots, seeds, seed)
    _grid_keys(head, grid)
    scale = scale or head.default_scale
    make_scaler(scale)
    X_pool, y_pool = _pool(data)
    t0 = time.perf_counter()
    points = []
    finite = [k for k in ks if k is not None]
    with tqdm(total=len(finite) * seeds, desc=f"{head.name} few-shot", unit="draw", leave=False,
              disable=None if progress else True) as bar:
        for k in finite:
            points.append(_kshot_point(head, data, X_pool, y_pool, k, seeds, bar, grid=grid, scale=scale,
                                       seed=seed, n_jobs=n_jobs))
            _log_point(head.name, points[-1])
    if None in ks:
        points.append(_all_point(head.name, data, o.replace(scale=scale)))
        _log_point(head.name, points[-1])
    return {
        "schema": SCHEMA, "kind": "fewshot", "head": head.name, "description": head.description,
        "label": f"{data.model} · {head.name}", "dataset": data.dataset, "model": data.model,
        "identity": data.identity.to_dict(), "layer": data.layer, "k": ks, "shots": [shot_label(k) for k in ks],
        "seeds": int(seeds), "seed": int(seed), "grid_name": grid, "scale": scale, "confidence": CONFIDENCE,
        "points": points, "sizes": data.sizes, "n_classes": len(data.classes), "validation": data.validation,
        "test_split": data.test_split, "test": data.test, "sources": data.sources, "versions": library_versions(),
        "timing": {"seconds": round(time.perf_counter() - t0, 4)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _log_point(head: str, p: dict) -> None:
    spread = f" ± {p['ci95_halfwidth']:.1%}" if p["ci95_halfwidth"] is not None else ""
    if p["k"] is None:
        log.info(f"{head} all train+val rows: test top-1 {p['mean']:.1%} (the validation protocol)")
    else:
        log.info(f"{head} {p['k']}-shot: test top-1 {p['mean']:.1%}{spread} over {len(p['accuracies'])} draws")


# --- files and the picture ----------------------------------------------------------------------

def write_fewshot(result: dict, results_root="results") -> tuple[Path, Path]:
    """fewshot-<head>.json and fewshot-<head>.png in the result folder of the features, each atomically."""
    folder = result_dir(result, results_root)
    json_path = folder / f"fewshot-{_safe(result['head'])}.json"
    png_path = folder / f"fewshot-{_safe(result['head'])}.png"
    with write_errors(json_path):
        write_text_atomic(json_path, json.dumps(result, indent=1))
    title = f"few-shot · {result.get('dataset')} · {result.get('layer')}"
    with write_errors(png_path):
        plot_fewshot([result], png_path, title=title)
    return json_path, png_path


def load_fewshot(path) -> dict:
    """A few-shot result JSON (UserError for another kind of file)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UserError(f"{path} is not a few-shot result ({SCHEMA})")
    return data


def _all_x(results: list[dict]) -> float:
    """Where 'all' sits on the log axis: one octave past the largest k of any curve."""
    finite = [p["k"] for r in results for p in r["points"] if p["k"] is not None]
    return 2.0 * max(finite) if finite else 1.0


def plot_fewshot(results: list[dict], path, title: str = "") -> Path:
    """Write fewshot_figure as a PNG; returns path."""
    from probe.output.plots import save_png

    return save_png(fewshot_figure(results, title), path)


def fewshot_figure(results: list[dict], title: str = ""):
    """Accuracy against shots (log x, 'all' last) for one or more few-shot results."""
    from matplotlib import ticker

    from probe.output.plots import new_figure, wrap

    x_all = _all_x(results)
    fig = new_figure(figsize=(7.5, 4.8))
    ax = fig.add_subplot()
    for i, r in enumerate(results):
        _draw_curve(ax, r, x_all, f"C{i % 10}")
    ticks = sorted({p["k"] for r in results for p in r["points"] if p["k"] is not None})
    has_all = any(p["k"] is None for r in results for p in r["points"])
    ax.set_xscale("log")
    ax.set_xticks(ticks + ([x_all] if has_all else []), [str(t) for t in ticks] + (["all"] if has_all else []))
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.set_xlabel("labelled images per class (log)")
    ax.set_ylabel("test top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title(wrap(title, 6.8, 9), fontsize=9)
    fig.tight_layout()
    return fig


def _draw_curve(ax, r: dict, x_all: float, colour: str) -> None:
    """Solid line and 95% band over the k-shot points; 'all' as a marker joined by a dotted line."""
    finite = [p for p in r["points"] if p["k"] is not None]
    label = r.get("label") or f"{r.get('model')} · {r.get('head')}"
    x = [p["k"] for p in finite]
    y = [100 * p["mean"] for p in finite]
    if finite:
        ax.plot(x, y, "o-", color=colour, label=label, ms=4)
        band = [(p["k"], 100 * p["ci95"][0], 100 * p["ci95"][1]) for p in finite if p["ci95"]]
        if band:
            bx, lo, hi = zip(*band)
            ax.fill_between(bx, lo, hi, color=colour, alpha=0.2, lw=0)
    full = [p for p in r["points"] if p["k"] is None]
    if full:
        ya = 100 * full[0]["mean"]
        ax.plot([x_all], [ya], "s", color=colour, ms=6, label=None if finite else label)
        if finite:
            ax.plot([x[-1], x_all], [y[-1], ya], ":", color=colour)
