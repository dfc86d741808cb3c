"""Every registered head learns separable data; the kNN vote matches a brute-force reference."""

import numpy as np
import pytest

from extract.core.errors import UserError
from probe.heads.catalog import HEADS, PAPER_WD, get_head, list_heads
from probe.heads.knn import KNNClassifier
from probe.protocol.search import search
from probe_helpers import blobs


@pytest.mark.parametrize("name", list_heads())
def test_head_separates_blobs(name):
    X, y = blobs(n_per_class=50, n_classes=4, dim=12, seed=1)
    Xt, yt = blobs(n_per_class=20, n_classes=4, dim=12, seed=1)  # same centres, fresh noise
    rng = np.random.default_rng(5)
    Xt = Xt + rng.normal(size=Xt.shape).astype(np.float32)
    head = get_head(name)
    found = search(head, X[:150], y[:150], X[150:], y[150:], progress=False)
    assert found.best in [g["params"] for g in found.grid]
    pipe = head.pipeline(**found.best).fit(X, y)
    assert np.mean(pipe.predict(Xt) == yt) >= 0.95


@pytest.mark.parametrize("name", list_heads())
def test_grids(name):
    stats = {"n": 100, "d": 8, "n_classes": 3, "x_var": 1.0}
    fast, paper = HEADS[name].grid("fast", stats), HEADS[name].grid("paper", stats)
    assert fast and len(paper) >= len(fast)
    HEADS[name].build(**fast[0])  # every grid point is a valid parameter set


def test_logreg_paper_grid_is_kornblith():
    Cs = [p["C"] for p in HEADS["logreg"].grid("paper", {})]
    assert len(Cs) == 45
    assert np.allclose(sorted(Cs), sorted(1 / PAPER_WD))
    assert Cs == sorted(Cs), "the path runs from strong to weak regularisation"


def test_unknown_head_suggests_close_match():
    with pytest.raises(UserError, match="did you mean 'svm-rbf'"):
        get_head("svm_rbf")


def _brute_knn(train, labels, query, k, T, n_classes):
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    out = np.zeros((len(query), n_classes))
    for i, q in enumerate(qn):
        sims = tn @ q
        for j in np.argsort(-sims)[:k]:
            out[i, labels[j]] += np.exp(sims[j] / T)
    return out / out.sum(axis=1, keepdims=True)


def test_knn_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    train, labels = rng.normal(size=(37, 5)), rng.integers(0, 3, 37)
    query = rng.normal(size=(11, 5))
    # chunk_bytes small enough to force several chunks
    knn = KNNClassifier(n_neighbors=7, chunk_bytes=4 * 37 * 3).fit(train, labels)
    ref = _brute_knn(train, labels, query, 7, 0.07, 3)
    assert np.allclose(knn.predict_proba(query), ref, atol=1e-5)
    assert np.array_equal(knn.predict(query), ref.argmax(axis=1))


def test_knn_is_sklearn_style():
    from sklearn.base import clone
    knn = KNNClassifier(n_neighbors=3, temperature=0.1)
    assert clone(knn).get_params()["n_neighbors"] == 3
    assert not hasattr(knn, "bank_")
    X, y = blobs(10, 2, 4)
    assert knn.fit(X, np.array(["a", "b"])[y]) is knn
    assert set(knn.predict(X)) <= {"a", "b"}
    assert knn.score(X, np.array(["a", "b"])[y]) == 1.0
