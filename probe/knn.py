"""DINO's cosine k-NN classifier: the k most similar training rows vote with weight exp(sim / T).

Staged like DINO's `eval_knn.py`: `cosine_topk` finds neighbours in bounded-memory chunks,
`knn_vote` turns them into class scores, and `KNNClassifier` wraps both sklearn-style.
"""

from __future__ import annotations

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

_CHUNK_BYTES = 128 * 1024 * 1024  # similarity block held in memory at once


def l2_normalize(X) -> np.ndarray:
    X = np.asarray(X, dtype=np.float32)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


def cosine_topk(train: np.ndarray, query: np.ndarray, k: int, chunk_bytes: int = _CHUNK_BYTES):
    """Similarities (Q, k) and indices (Q, k) of each query's k nearest rows of `train`, best first.

    Both inputs must already be L2-normalised float32. Memory is bounded by `chunk_bytes`.
    """
    import torch  # imported here: reading results should not pay for torch

    k = min(k, len(train))
    bank = torch.from_numpy(np.ascontiguousarray(train))
    rows = max(1, chunk_bytes // (4 * max(1, len(train))))
    sims = np.empty((len(query), k), np.float32)
    idx = np.empty((len(query), k), np.int64)
    with torch.no_grad():
        for start in range(0, len(query), rows):
            block = torch.from_numpy(np.ascontiguousarray(query[start:start + rows])) @ bank.T
            s, i = block.topk(k, dim=1, largest=True, sorted=True)
            sims[start:start + rows], idx[start:start + rows] = s.numpy(), i.numpy()
    return sims, idx


def knn_vote(sims: np.ndarray, neighbour_labels: np.ndarray, k: int, n_classes: int,
             temperature: float = 0.07) -> np.ndarray:
    """Class probabilities (Q, C) from the first k neighbours: sum of exp(sim / T) per class, normalised."""
    s, lab = sims[:, :k].astype(np.float64), neighbour_labels[:, :k]
    # Subtracting the row maximum leaves the normalised vote unchanged and avoids overflow.
    w = np.exp((s - s[:, :1]) / temperature)
    votes = np.zeros((len(s), n_classes))
    np.add.at(votes, (np.repeat(np.arange(len(s)), lab.shape[1]), lab.ravel()), w.ravel())
    return votes / votes.sum(axis=1, keepdims=True)


class KNNClassifier(ClassifierMixin, BaseEstimator):
    """Cosine k-NN with temperature-weighted vote (Wu et al. 2018, DINO)."""

    def __init__(self, n_neighbors: int = 20, temperature: float = 0.07, chunk_bytes: int = _CHUNK_BYTES):
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.chunk_bytes = chunk_bytes

    def fit(self, X, y):
        self.classes_, y_enc = np.unique(np.asarray(y), return_inverse=True)
        self.bank_ = l2_normalize(X)
        self.bank_labels_ = y_enc.astype(np.int64)
        self.n_features_in_ = self.bank_.shape[1]
        return self

    def kneighbors(self, X, n_neighbors: int | None = None):
        """(similarities, indices) of the nearest training rows, most similar first."""
        check_is_fitted(self, "bank_")
        return cosine_topk(self.bank_, l2_normalize(X), n_neighbors or self.n_neighbors, self.chunk_bytes)

    def proba_from_neighbours(self, sims, idx, k: int | None = None) -> np.ndarray:
        return knn_vote(sims, self.bank_labels_[idx], k or self.n_neighbors, len(self.classes_), self.temperature)

    def predict_proba(self, X) -> np.ndarray:
        sims, idx = self.kneighbors(X)
        return self.proba_from_neighbours(sims, idx)

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.predict_proba(X).argmax(axis=1)]
