"""logreg on torch reaches scikit-learn's solution; streamed features give what in-memory ones give."""

import pickle
import warnings

import h5py
import numpy as np
import pytest
from sklearn.datasets import load_digits, make_classification
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from extract.core.errors import UserError
from probe.heads.catalog import get_head
from probe.heads.placement import place
from probe.protocol.search import refit, search
from probe.protocol.rows import Rows, concat
from probe.heads.torch_logreg import TorchLogisticRegression


@pytest.fixture(autouse=True)
def one_thread():
    """Small problems: one BLAS/OpenMP thread (torch's too) is fastest, and the machine may be shared."""
    with threadpool_limits(1):
        yield


def _split(X, y, seed=0):
    """50 / 20 / 30 train / validation / test, float32."""
    order = np.random.default_rng(seed).permutation(len(y))
    a, b = int(0.5 * len(y)), int(0.7 * len(y))
    return [(X[order[s]].astype(np.float32), y[order[s]]) for s in (slice(0, a), slice(a, b), slice(b, None))]


def _synthetic():
    return make_classification(n_samples=6000, n_features=64, n_informative=24, n_classes=10,
                               n_clusters_per_class=2, class_sep=1.5, random_state=0)


def _objective(coef, intercept, X, y, C) -> float:
    """scikit-learn's LogisticRegression objective: summed cross-entropy + 0.5 / C * ||W||^2."""
    z = X.astype(np.float64) @ np.asarray(coef, np.float64).T + intercept
    if z.shape[1] == 1:
        z = np.hstack([np.zeros_like(z), z])
    top = z.max(axis=1)
    lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1))
    return float((lse - z[np.arange(len(y)), y]).sum() + 0.5 / C * (np.asarray(coef, np.float64) ** 2).sum())


@pytest.mark.parametrize("data", ["digits", "synthetic"])
def test_selects_the_same_C_and_scores_like_sklearn(data):
    X, y = load_digits(return_X_y=True) if data == "digits" else _synthetic()
    (Xtr, ytr), (Xva, yva), (Xte, yte) = _split(X, y)
    out = {}
    for head in (get_head("logreg"), place("logreg", solver="torch", device="cpu")):
        found = search(head, Xtr, ytr, Xva, yva, progress=False)
        pipe = refit(head, found.best, np.concatenate([Xtr, Xva]), np.concatenate([ytr, yva]), warm=found.warm)
        out[head.solver] = found.best["C"], 100 * np.mean(pipe.predict(Xte) == yte)
    assert out["torch"][0] == out["sklearn"][0]
    assert abs(out["torch"][1] - out["sklearn"][1]) <= 0.2
    assert out["torch"][1] > (90 if data == "digits" else 50)


@pytest.mark.parametrize("C", [1e-2, 1.0, 30.0])
def test_objective_matches_sklearn_at_the_same_C(C):
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    Xs = StandardScaler().fit_transform(X).astype(np.float32)
    ref = LogisticRegression(C=C, tol=1e-7, max_iter=5000).fit(Xs, y)
    ours = TorchLogisticRegression(C=C, tol=1e-7, max_iter=5000, device="cpu").fit(X, y)
    want = _objective(ref.coef_, ref.intercept_, Xs, y, C)
    assert ours.objective_ == pytest.approx(_objective(ours.coef_, ours.intercept_, Xs, y, C), rel=1e-5)
    assert ours.objective_ == pytest.approx(want, rel=1e-4)
    assert ours.objective_ <= want * (1 + 1e-6)  # as low as sklearn's L-BFGS gets, or lower
    assert np.mean(ours.predict(X) == ref.predict(Xs)) >= 0.999
    assert np.abs(ours.predict_proba(X) - ref.predict_proba(Xs)).max() < 1e-3


def test_two_classes_use_sklearns_binomial_model():
    X, y = load_digits(return_X_y=True)
    X, y = X.astype(np.float32), (y >= 5).astype(int)
    Xs = StandardScaler().fit_transform(X).astype(np.float32)
    ref = LogisticRegression(C=0.1, tol=1e-7, max_iter=5000).fit(Xs, y)
    ours = TorchLogisticRegression(C=0.1, tol=1e-7, max_iter=5000, device="cpu").fit(X, y)
    assert ours.coef_.shape == ref.coef_.shape == (1, 64)
    assert ours.objective_ == pytest.approx(_objective(ref.coef_, ref.intercept_, Xs, y, 0.1), rel=1e-5)
    assert np.median(np.abs(ours.decision_function(X) - ref.decision_function(Xs))) < 1e-3
    assert np.abs(ours.predict_proba(X) - ref.predict_proba(Xs)).max() < 1e-2
    assert np.array_equal(ours.predict(X), ref.predict(Xs))


def test_warm_start_continues_from_the_previous_solution():
    (X, y), _, _ = _split(*_synthetic())
    cold = TorchLogisticRegression(C=1.0, device="cpu", tol=1e-6).fit(X, y)
    warm = TorchLogisticRegression(C=0.5, device="cpu", tol=1e-6, warm_start=True).fit(X, y)
    warm.set_params(C=1.0).fit(X, y)
    assert warm.n_iter_[0] < 0.75 * cold.n_iter_[0]
    assert warm.objective_ == pytest.approx(cold.objective_, rel=1e-5)
    assert np.abs(warm.coef_ - cold.coef_).max() < 1e-2
    # without warm_start the previous coefficients are ignored
    again = TorchLogisticRegression(C=0.5, device="cpu", tol=1e-6).fit(X, y)
    assert again.set_params(C=1.0).fit(X, y).n_iter_[0] == cold.n_iter_[0]


def test_path_search_runs_on_torch():
    (Xtr, ytr), (Xva, yva), _ = _split(*load_digits(return_X_y=True))
    head = place("logreg", solver="torch", device="cpu")
    found = search(head, Xtr, ytr, Xva, yva, progress=False)
    Cs = [r["params"]["C"] for r in found.grid]
    assert len(Cs) == len(set(Cs)) >= 12 and all(r["converged"] for r in found.grid)
    assert found.warm["coef_"].shape == (10, 64)
    assert max(r["val_top1"] for r in found.grid) > 0.9


def test_streamed_from_hdf5_equals_in_memory(tmp_path):
    (X, y), _, _ = _split(*_synthetic())
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["x"] = X.astype(np.float16).astype(np.float32)
    X = X.astype(np.float16).astype(np.float32)
    memory = TorchLogisticRegression(C=0.1, device="cpu").fit(X, y)
    scaler = StandardScaler().fit(X)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        streamed = TorchLogisticRegression(C=0.1, device="cpu", block_rows=97).fit(f["x"], y)
        assert np.array_equal(streamed.predict(f["x"]), memory.predict(X))
    assert np.allclose(streamed.mean_, scaler.mean_, rtol=1e-6, atol=1e-6)
    assert np.allclose(streamed.scale_, scaler.scale_, rtol=1e-6)
    assert streamed.objective_ == pytest.approx(memory.objective_, rel=1e-5)
    assert np.abs(streamed.coef_ - memory.coef_).max() < 1e-3
    # a Rows view of a subset (validation carved out) streams the same rows as the array subset
    keep = np.arange(len(y)) % 5 != 0
    view = TorchLogisticRegression(C=0.1, device="cpu", block_rows=101).fit(Rows.of(tmp_path / "f.h5", "x")[keep],
                                                                             y[keep])
    subset = TorchLogisticRegression(C=0.1, device="cpu").fit(X[keep], y[keep])
    assert view.objective_ == pytest.approx(subset.objective_, rel=1e-5)


def test_stopping_at_max_iter_warns_like_sklearn():
    (X, y), _, _ = _split(*_synthetic())
    with pytest.warns(ConvergenceWarning):
        est = TorchLogisticRegression(C=100.0, device="cpu", max_iter=3).fit(X, y)
    assert est.n_iter_[0] == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        TorchLogisticRegression(C=0.01, device="cpu").fit(X, y)


def test_saved_head_pickles_and_predicts_the_same():
    (X, y), _, (Xte, _) = _split(*load_digits(return_X_y=True))
    pipe = place("logreg", solver="torch", device="cpu").pipeline(C=0.1).fit(X, y)
    assert pipe.named_steps["scale"] == "passthrough"  # the estimator scales its own input
    again = pickle.loads(pickle.dumps(pipe))
    assert np.array_equal(again.predict_proba(Xte), pipe.predict_proba(Xte))


def test_rows_views_read_the_right_rows(tmp_path):
    X = np.arange(60, dtype=np.float32).reshape(20, 3)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = X
        f["bad"] = np.where(X == 40, np.nan, X)
    rows = Rows.of(tmp_path / "a.h5", "x")
    mask = np.arange(20) % 3 == 1
    picked = rows[mask]
    assert picked.shape == (mask.sum(), 3)
    assert np.array_equal(np.asarray(picked), X[mask])
    joined = concat(picked, rows[~mask])
    assert np.array_equal(np.asarray(joined), np.concatenate([X[mask], X[~mask]]))
    assert np.array_equal(np.asarray(joined[[0, 5, 19]]), np.concatenate([X[mask], X[~mask]])[[0, 5, 19]])
    assert np.array_equal(np.concatenate(list(joined.blocks(4))), np.asarray(joined))
    assert np.array_equal(np.asarray(pickle.loads(pickle.dumps(joined))), np.asarray(joined))
    with pytest.raises(UserError, match="NaN or inf"):
        np.asarray(Rows.of(tmp_path / "a.h5", "bad"))
    with pytest.raises(ValueError, match="sorted"):
        rows[[3, 1]]
