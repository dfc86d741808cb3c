"""The head registry: name -> estimator builder, hyperparameter grids, default scaling, cost model.

Every head becomes `Pipeline([("scale", scaler), ("head", estimator)])` so scaling is fit on
the training rows only. Grids come in two sizes: `fast` (default) and `paper` (the grids of
Kornblith et al. 2019 / Ericsson et al. 2021 / VISSL / DINO).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from sklearn.svm import SVC, LinearSVC

from extract.core.errors import UserError

from probe.heads.knn import KNNClassifier

GRIDS = ("fast", "paper")
SCALES = ("standard", "l2", "none")

# Logistic regression (Kornblith 2019, Ericsson 2021): wd on 45 log-spaced values 1e-6..1e5, C = 1/wd.
PAPER_WD = np.logspace(-6, 5, 45)
FAST_WD = PAPER_WD[::4]  # every decade, 12 values; refined around the winner (see protocol.sweep_path)
FAST_REFINE = 2           # paper-grid neighbours on each side of the fast winner that are also tried
# VISSL's linear SVM costs: 0.5 ** (4..19) plus 0.1 and 0.01.
VISSL_COSTS = sorted({*(0.5 ** p for p in range(4, 20)), 0.01, 0.1})
KNN_K = (10, 20, 100, 200)


@dataclass(frozen=True)
class Head:
    """One classical head: how to build it, what to search, and how to scale its input."""

    name: str
    description: str
    default_scale: str
    build: Callable[..., object]              # build(seed=, n_jobs=, **params) -> unfitted estimator
    grid: Callable[[str, dict], list[dict]]   # grid(grid_name, stats) -> [params]; stats: n, d, n_classes, x_var
    path: bool = False                        # grid is a regularisation path, searched with warm starts
    seconds_per_fit: Callable[[dict, dict], float] | None = None   # rough cost model (params, stats) -> s
    solver: str = "sklearn"                   # what fits it: sklearn or torch (see probe.heads.placement)
    device: str = "cpu"                       # where it runs
    streams: bool = False                     # can fit features read from the cache block by block
    scales_itself: bool = False               # the estimator scales its input; the pipeline passes X through

    def pipeline(self, scale: str | None = None, seed: int = 0, n_jobs: int | None = None, **params) -> Pipeline:
        """Scaler + estimator; a head that scales itself had its scaling fixed when it was placed."""
        scaler = "passthrough" if self.scales_itself else make_scaler(scale or self.default_scale)
        return Pipeline([("scale", scaler), ("head", self.build(seed=seed, n_jobs=n_jobs, **params))])


def make_scaler(scale: str):
    if scale == "standard":
        return StandardScaler()
    if scale == "l2":
        return Normalizer(norm="l2")
    if scale == "none":
        return "passthrough"
    raise UserError(f"unknown --scale {scale!r}; choose one of {', '.join(SCALES)}")


def _check_grid(grid: str) -> None:
    if grid not in GRIDS:
        raise UserError(f"unknown --grid {grid!r}; choose one of {', '.join(GRIDS)}")


# --- builders ---------------------------------------------------------------------------------

def _ridge(seed=0, n_jobs=None, alpha=1.0):
    return RidgeClassifier(alpha=alpha)


def _logreg(seed=0, n_jobs=None, C=1.0):
    # lbfgs on the multinomial loss with an L2 penalty (the default penalty in every sklearn >= 1.3).
    return LogisticRegression(C=C, solver="lbfgs", max_iter=1000, tol=1e-4)


def build_torch_logreg(seed=0, n_jobs=None, C=1.0, device="auto", scale="standard"):
    """The torch twin of _logreg (same objective and tolerance), scaling its own input."""
    from probe.heads.torch_logreg import TorchLogisticRegression
    return TorchLogisticRegression(C=C, scale=scale, device=device, max_iter=1000, tol=1e-4)


def _linear_svm(seed=0, n_jobs=None, C=1.0):
    # liblinear's dual solver needs few passes at small C (measured 2-4x faster than the primal one on
    # standardised CNN features); at larger C it needs many, and "auto" picks the primal for n > d.
    return LinearSVC(C=C, dual=True if C <= 1e-3 else "auto", max_iter=2000, random_state=seed)


def _rbf_svm(seed=0, n_jobs=None, C=1.0, gamma="scale"):
    return SVC(C=C, gamma=gamma, kernel="rbf", cache_size=1000, random_state=seed)


def _forest(seed=0, n_jobs=None, n_estimators=100, max_features="sqrt"):
    return RandomForestClassifier(n_estimators=n_estimators, max_features=max_features, n_jobs=n_jobs,
                                  random_state=seed)


def _knn(seed=0, n_jobs=None, n_neighbors=20, device="auto"):
    return KNNClassifier(n_neighbors=n_neighbors, temperature=0.07, device=device)


# --- grids ------------------------------------------------------------------------------------

def _ridge_grid(grid, stats):
    _check_grid(grid)
    alphas = np.logspace(-2, 5, 8) if grid == "fast" else np.logspace(-4, 6, 21)
    return [{"alpha": float(a)} for a in alphas]


def _logreg_grid(grid, stats):
    """Strong to weak regularisation (descending wd), the order warm starts follow."""
    _check_grid(grid)
    wds = FAST_WD if grid == "fast" else PAPER_WD
    return [{"C": float(1.0 / wd)} for wd in sorted(wds, reverse=True)]


def _svm_grid(grid, stats):
    _check_grid(grid)
    costs = [1e-5, 1e-4, 1e-3, 1e-2] if grid == "fast" else VISSL_COSTS
    return [{"C": float(c)} for c in costs]


def _rbf_grid(grid, stats):
    _check_grid(grid)
    # gamma relative to sklearn's "scale" value 1 / (d * var(X)) of the scaled training features.
    base = 1.0 / (max(stats["d"], 1) * (stats.get("x_var") or 1.0))
    if grid == "fast":
        costs, factors = (1.0, 10.0), (0.5, 1.0, 2.0)
    else:
        costs, factors = (0.1, 1.0, 10.0, 100.0, 1000.0), (0.1, 0.3, 1.0, 3.0, 10.0)
    return [{"C": c, "gamma": float(base * f)} for c in costs for f in factors]


def _forest_grid(grid, stats):
    _check_grid(grid)
    if grid == "fast":
        trees, feats = (100, 300), ("sqrt",)
    else:
        trees, feats = (100, 300, 1000), ("sqrt", "log2", 0.05, 0.2)
    return [{"n_estimators": t, "max_features": f} for t in trees for f in feats]


def _knn_grid(grid, stats):
    _check_grid(grid)
    return [{"n_neighbors": k} for k in KNN_K]


# --- cost models (seconds per fit on one core; rough, only used to warn) ------------------------

def _rbf_cost(params, stats):
    return 5e-10 * stats["n"] ** 2 * stats["d"]


def _forest_cost(params, stats):
    n, d = stats["n"], stats["d"]
    mf = params["max_features"]
    k = {"sqrt": np.sqrt(d), "log2": np.log2(d)}.get(mf, mf * d if isinstance(mf, float) else mf)
    return 4e-8 * params["n_estimators"] * n * np.log2(max(n, 2)) * k


HEADS: dict[str, Head] = {
    "linear": Head("linear", "least-squares linear classifier (RidgeClassifier)", "standard", _ridge, _ridge_grid),
    "logreg": Head("logreg", "multinomial L2 logistic regression (L-BFGS)", "standard", _logreg, _logreg_grid,
                   path=True),
    "svm": Head("svm", "linear SVM (LinearSVC)", "standard", _linear_svm, _svm_grid),
    "svm-rbf": Head("svm-rbf", "RBF-kernel SVM (SVC)", "standard", _rbf_svm, _rbf_grid, seconds_per_fit=_rbf_cost),
    "rf": Head("rf", "random forest", "none", _forest, _forest_grid, seconds_per_fit=_forest_cost),
    "knn": Head("knn", "cosine k-NN, DINO temperature-weighted vote", "none", _knn, _knn_grid, solver="torch",
                streams=True),
}


# Evaluations run like a head by `python -m probe --head NAME` (a result JSON of the same schema)
# but fitting nothing, so not part of `all`: probe.analyses.retrieval.
OPT_IN = ("retrieval",)


def list_heads() -> list[str]:
    return list(HEADS)


def get_head(name: str) -> Head:
    """The registered head, or a UserError suggesting the closest names."""
    if name in HEADS:
        return HEADS[name]
    if name in OPT_IN:
        raise UserError(f"{name} fits no head: it runs as `python -m probe --head {name}` (alone, beside other "
                        "heads, or with --model/--layer comparisons), not here")
    close = difflib.get_close_matches(name, [*HEADS, *OPT_IN], n=2, cutoff=0.4)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UserError(f"unknown head {name!r}{hint} (heads: {', '.join(HEADS)}, all; opt-in: {', '.join(OPT_IN)})")
