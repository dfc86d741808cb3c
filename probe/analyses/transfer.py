"""Transferability scores of labelled features, computed from moments streamed out of the cache.

    m = moments_of_file("cache/digits/resnet50/train.h5", layer="penultimate")
    logme(m), regularised_hscore(m)

Both scores need only a few sums over the rows, accumulated block by block in two passes (the mean
first, then centred products), so memory is O(D^2 + C D) whatever N is:

- **LogME** (You et al., ICML 2021): for each class c, the log marginal evidence of a Bayesian
  linear regression of the one-hot column y_c on the raw features F (prior precision alpha on the
  weights, noise precision beta), maximised over alpha and beta by the paper's fixed-point updates;
  the score is the mean over classes of evidence / N. Everything runs in the eigenbasis of F^T F
  (F^T F = V diag(s) V^T): with t = V^T F^T y_c and z = beta t / (alpha + beta s), the weights'
  squared norm is |z|^2 and the residual |y_c - F m|^2 = n_c - 2 z.t + sum(s z^2), so no row is
  read again. Stopping rule as in the authors' code: at most 11 updates, stop when alpha/beta moves
  by less than 1%.
- **Regularised H-score** (Ibrahim et al. 2022, "Newer is not always better"): the H-score of
  Bao et al. 2019, tr(cov(f)^-1 cov(E[f|y])), with cov(f) replaced by its Ledoit-Wolf shrinkage
  (1 - a) S + a mu I (S the 1/N covariance, mu = tr(S)/D, a the Ledoit-Wolf coefficient, as
  scikit-learn's LedoitWolf computes it) and the between-class covariance (1/(N-1), as np.cov)
  scaled by (1 - a). A discriminant statistic (how much of the features' variance separates the
  class means), where LogME is a likelihood: the two can disagree, which is why both are shown.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import scipy.linalg
from tqdm.auto import tqdm

from extract.core.errors import UserError
from extract.store.cache import iter_rows, load_features

BLOCK_BYTES = 64 * 1024 * 1024   # float64 rows held at once while accumulating
LOGME_MAX_ITER = 11
LOGME_TOL = 1e-2

Blocks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]   # a fresh pass of (X, y) blocks per call


@dataclass
class Moments:
    """Sufficient statistics of labelled rows: n, the mean, the centred Gram matrix, per-class counts
    and centred sums, and the sum of |x - mean|^4 (for the Ledoit-Wolf coefficient)."""

    n: int
    mean: np.ndarray          # (D,)
    gram: np.ndarray          # (D, D) sum of (x - mean)(x - mean)^T
    counts: np.ndarray        # (C,) rows per class id
    class_sums: np.ndarray    # (C, D) sum of (x - mean) per class
    fourth: float             # sum of |x - mean|^4

    @property
    def dim(self) -> int:
        return len(self.mean)

    def raw_gram(self) -> np.ndarray:
        """F^T F of the uncentred rows."""
        return self.gram + self.n * np.outer(self.mean, self.mean)

    def raw_class_sums(self) -> np.ndarray:
        """F^T y_c for every class: the uncentred per-class sums."""
        return self.class_sums + self.counts[:, None] * self.mean[None, :]


def block_rows(dim: int, block_bytes: int = BLOCK_BYTES) -> int:
    """Rows per block so that a float64 copy stays within block_bytes."""
    return max(64, block_bytes // (8 * max(1, dim)))


def array_blocks(X, y, rows: int = 4096) -> Blocks:
    """Blocks over in-memory arrays (tests, small data)."""
    X, y = np.asarray(X), np.asarray(y)
    return lambda: ((X[s:s + rows], y[s:s + rows]) for s in range(0, len(y), rows))


def _checked(blocks: Iterable, what: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for X, y in blocks:
        X = np.asarray(X, dtype=np.float64)
        if not np.isfinite(X).all():
            raise UserError(f"{what} contains NaN or inf values")
        yield X, np.asarray(y, dtype=np.int64)


def moments(blocks: Blocks, n_classes: int | None = None, *, what: str = "the features",
            progress: bool = False) -> Moments:
    """Two passes over `blocks()`: sums and counts, then centred products. n_classes: at least
    max(y) + 1 (class ids absent from the rows get a count of 0)."""
    n, total, sums, counts = 0, None, None, None
    for X, y in _checked(blocks(), what):
        if total is None:
            total = np.zeros(X.shape[1])
        if len(y) and (y.min() < 0):
            raise UserError(f"{what}: labels must be class ids >= 0")
        width = max(n_classes or 0, int(y.max()) + 1 if len(y) else 0, 0 if counts is None else len(counts))
        sums, counts = _grow(sums, counts, width, X.shape[1])
        np.add.at(sums, y, X)
        counts += np.bincount(y, minlength=width)
        total += X.sum(axis=0)
        n += len(y)
    if n < 2:
        raise UserError(f"{what} has {n} row(s); a transferability score needs at least two")
    mean = total / n
    gram, fourth = np.zeros((len(mean), len(mean))), 0.0
    for X, _ in tqdm(_checked(blocks(), what), desc="moments", unit="block", leave=False,
                     disable=None if progress else True):
        Z = X - mean
        gram += Z.T @ Z
        fourth += float(np.sum(np.einsum("ij,ij->i", Z, Z) ** 2))
    class_sums = sums - counts[:, None] * mean[None, :]
    return Moments(n, mean, gram, counts.astype(np.int64), class_sums, fourth)


def _grow(sums, counts, width: int, dim: int):
    if sums is None:
        return np.zeros((width, dim)), np.zeros(width, np.int64)
    if width > len(counts):
        sums = np.vstack([sums, np.zeros((width - len(counts), dim))])
        counts = np.concatenate([counts, np.zeros(width - len(counts), np.int64)])
    return sums, counts


# --- LogME ------------------------------------------------------------------------------------

def _class_evidence(s: np.ndarray, t: np.ndarray, yy: float, n: int, max_iter: int, tol: float) -> float:
    """Maximum log evidence / n of one target column, in the eigenbasis (s: eigenvalues of F^T F,
    t: V^T F^T y, yy: y^T y)."""
    d = len(s)
    alpha, beta = 1.0, 1.0
    lam = alpha / beta
    for _ in range(max_iter):
        gamma = float(np.sum(s / (s + lam)))
        z = beta * t / (alpha + beta * s)
        alpha_de = float(z @ z)
        alpha = gamma / max(alpha_de, np.finfo(float).tiny)
        beta_de = max(yy - 2.0 * float(z @ t) + float(np.sum(s * z * z)), np.finfo(float).tiny)
        beta = (n - gamma) / beta_de
        new_lam = alpha / beta
        if abs(new_lam - lam) / lam < tol:
            break
        lam = new_lam
    evidence = (d / 2.0 * np.log(alpha) + n / 2.0 * np.log(beta) - 0.5 * np.sum(np.log(alpha + beta * s))
                - beta / 2.0 * beta_de - alpha / 2.0 * alpha_de - n / 2.0 * np.log(2 * np.pi))
    return float(evidence / n)


def logme(m: Moments, max_iter: int = LOGME_MAX_ITER, tol: float = LOGME_TOL) -> float:
    """LogME of the rows summarised by `m`: the mean over the classes present of the per-class
    evidence / N (higher is better)."""
    s, V = np.linalg.eigh(m.raw_gram())
    s = np.clip(s, 0.0, None)            # F^T F is positive semi-definite; rounding can dip below 0
    T = m.raw_class_sums() @ V           # row c: t_c = V^T F^T y_c
    present = np.flatnonzero(m.counts > 0)
    return float(np.mean([_class_evidence(s, T[c], float(m.counts[c]), m.n, max_iter, tol) for c in present]))


# --- regularised H-score ----------------------------------------------------------------------

def ledoit_wolf_shrinkage(m: Moments) -> float:
    """The Ledoit-Wolf coefficient of the centred rows (scikit-learn's formula), from moments."""
    n, p = m.n, m.dim
    S = m.gram / n
    trace = float(np.trace(S))
    mu = trace / p
    delta_ = float(np.sum(S * S))
    beta = (m.fourth / n - delta_) / (p * n)
    delta = (delta_ - 2.0 * mu * trace + p * mu ** 2) / p
    beta = min(beta, delta)
    return 0.0 if beta == 0 else float(beta / delta)


def regularised_hscore(m: Moments) -> tuple[float, float]:
    """(H-score with Ledoit-Wolf shrinkage, the shrinkage coefficient); higher is better."""
    a = ledoit_wolf_shrinkage(m)
    S = m.gram / m.n
    mu = float(np.trace(S)) / m.dim
    shrunk = (1.0 - a) * S + a * mu * np.eye(m.dim)
    present = m.counts > 0
    means = m.class_sums[present] / m.counts[present, None]                # centred class means
    B = means * np.sqrt(m.counts[present, None] / (m.n - 1.0))             # between cov = B^T B
    try:
        solved = scipy.linalg.cho_solve(scipy.linalg.cho_factor(shrunk), B.T)
    except np.linalg.LinAlgError:    # no shrinkage and a singular covariance: the pseudo-inverse
        solved = np.linalg.pinv(shrunk, rcond=1e-15, hermitian=True) @ B.T
    return float((1.0 - a) * np.sum(B.T * solved)), a


# --- a cache file -----------------------------------------------------------------------------

def file_blocks(path, layer: str | None, rows: int, keep: np.ndarray | None = None) -> Blocks:
    """Passes over a cache file's (X, y) blocks, read with extract.store.cache.iter_rows; with `keep`
    (a mask over the file's rows) only those rows."""
    if keep is None:
        return lambda: iter_rows(path, layer, rows)

    def passes():
        start = 0
        for X, y in iter_rows(path, layer, rows):
            k = keep[start:start + len(y)]
            start += len(y)
            yield X[k], y[k]
    return passes


def scores_of_file(path, layer: str | None = None, *, block_bytes: int = BLOCK_BYTES,
                   progress: bool = False, keep: np.ndarray | None = None) -> dict:
    """LogME and the regularised H-score of one tap of one cache file (meant for the train split),
    with the row count, dimension and seconds taken; `keep` masks the rows scored."""
    t0 = time.perf_counter()
    head = load_features(path, layer, lazy=True)
    n, dim = head.X.shape
    n = n if keep is None else int(np.count_nonzero(keep))
    n_classes = len(head.meta.get("classes") or []) or None
    head.meta["file"].close()
    m = moments(file_blocks(path, layer, block_rows(dim, block_bytes), keep), n_classes, what=str(path),
                progress=progress)
    t1 = time.perf_counter()
    score = logme(m)
    t2 = time.perf_counter()
    hscore, shrinkage = regularised_hscore(m)
    t3 = time.perf_counter()
    return {"logme": score, "hscore": hscore, "shrinkage": shrinkage, "n": int(n), "dims": int(dim),
            "classes": int(np.count_nonzero(m.counts)),
            "seconds": {"moments": round(t1 - t0, 3), "logme": round(t2 - t1, 3), "hscore": round(t3 - t2, 3)}}
