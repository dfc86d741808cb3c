"""LogME and the regularised H-score (probe.analyses.transfer) against straightforward dense versions."""

import numpy as np
import pytest
from sklearn.covariance import LedoitWolf

from extract.core.errors import UserError
from probe.analyses.transfer import (array_blocks, ledoit_wolf_shrinkage, logme, moments, regularised_hscore,
                                     scores_of_file)
from probe_helpers import write_split


def dense_logme(F, y, max_iter=11, tol=1e-2):
    """LogME as the paper states it: per class, fixed-point updates of alpha and beta with the dense
    eigendecomposition of F^T F and the residual computed from the rows themselves."""
    F = np.asarray(F, np.float64)
    n, d = F.shape
    s, V = np.linalg.eigh(F.T @ F)
    s = np.clip(s, 0, None)
    evidences = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        alpha, beta = 1.0, 1.0
        for _ in range(max_iter):
            A_inv = V @ np.diag(1.0 / (alpha + beta * s)) @ V.T          # (alpha I + beta F^T F)^-1
            m = beta * A_inv @ F.T @ target                                # posterior mean of the weights
            gamma = np.sum(beta * s / (alpha + beta * s))
            alpha_de, beta_de = m @ m, np.sum((target - F @ m) ** 2)
            old = alpha / beta
            alpha, beta = gamma / alpha_de, (n - gamma) / beta_de
            if abs(alpha / beta - old) / old < tol:
                break
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
                    - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi))
        evidences.append(evidence / n)
    return float(np.mean(evidences))


def dense_hscore(F, y):
    """Ibrahim et al.'s regularised H-score with scikit-learn's Ledoit-Wolf estimator."""
    f = F - F.mean(axis=0)
    lw = LedoitWolf(assume_centered=False).fit(f)
    g = np.zeros_like(f)
    for c in np.unique(y):
        g[y == c] = f[y == c].mean(axis=0)
    between = np.cov(g, rowvar=False)
    return float(np.trace(np.linalg.pinv(lw.covariance_) @ ((1 - lw.shrinkage_) * between))), lw.shrinkage_


def planted(n=400, d=24, classes=5, sep=3.0, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d)) * sep
    return centres[y] + rng.normal(size=(n, d)) + 1.5, y


@pytest.mark.parametrize("n, d, sep", [(400, 24, 3.0), (300, 20, 0.3), (60, 100, 2.0)])   # the last: D > N
def test_logme_equals_the_dense_fixed_point(n, d, sep):
    X, y = planted(n, d, sep=sep, seed=n)
    m = moments(array_blocks(X, y, rows=37))
    assert logme(m) == pytest.approx(dense_logme(X, y), rel=1e-7, abs=1e-9)
    assert logme(m, max_iter=100, tol=1e-9) == pytest.approx(dense_logme(X, y, 100, 1e-9), rel=1e-7, abs=1e-9)


@pytest.mark.parametrize("n, d", [(400, 24), (60, 100)])
def test_regularised_hscore_equals_scikit_learns_ledoit_wolf_version(n, d):
    X, y = planted(n, d, seed=d)
    m = moments(array_blocks(X, y, rows=50))
    expected, shrinkage = dense_hscore(X, y)
    assert ledoit_wolf_shrinkage(m) == pytest.approx(shrinkage, rel=1e-9)
    score, a = regularised_hscore(m)
    assert a == pytest.approx(shrinkage, rel=1e-9) and 0 < a < 1
    assert score == pytest.approx(expected, rel=1e-7)


def test_both_scores_rank_planted_class_structure_above_noise():
    X, y = planted(sep=2.0)
    noise = np.random.default_rng(9).normal(size=X.shape) + 1.5
    weak = X * 0.3 + noise * 0.7
    ranked = []
    for feats in (X, weak, noise):
        m = moments(array_blocks(feats, y))
        ranked.append((logme(m), regularised_hscore(m)[0]))
    assert ranked[0][0] > ranked[1][0] > ranked[2][0]
    assert ranked[0][1] > ranked[1][1] > ranked[2][1]


def test_moments_do_not_depend_on_the_block_size():
    X, y = planted(n=203)
    one, many = moments(array_blocks(X, y, rows=1000)), moments(array_blocks(X, y, rows=7))
    assert one.n == many.n == 203 and np.array_equal(one.counts, many.counts)
    for name in ("mean", "gram", "class_sums"):
        assert np.allclose(getattr(one, name), getattr(many, name), rtol=1e-10, atol=1e-9)
    assert one.fourth == pytest.approx(many.fourth, rel=1e-12)
    centred = X - X.mean(axis=0)
    assert np.allclose(one.gram, centred.T @ centred) and np.allclose(one.raw_gram(), X.T @ X)


def test_a_cache_file_scores_as_its_arrays_and_bad_rows_are_refused(tmp_path):
    X, y = planted(n=150, d=12)
    path = write_split(tmp_path, "train", X.astype(np.float32), y)
    out = scores_of_file(path, block_bytes=8 * 12 * 16)    # 16-row blocks
    m = moments(array_blocks(X.astype(np.float32), y))
    assert out["n"] == 150 and out["dims"] == 12 and out["classes"] == 5
    assert out["logme"] == pytest.approx(logme(m), rel=1e-9)
    assert out["hscore"] == pytest.approx(regularised_hscore(m)[0], rel=1e-9)
    X[3, 2] = np.nan
    with pytest.raises(UserError, match="NaN"):
        moments(array_blocks(X, y))
    with pytest.raises(UserError, match="at least two"):
        moments(array_blocks(X[:1], y[:1]))
