"""Classification metrics of one scored split, as plain JSON-able values."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score


def top_k_accuracy(y_true, scores, k: int) -> float:
    """Fraction of rows whose true class is among the k highest scores (columns = class ids)."""
    scores = np.asarray(scores)
    top = np.argpartition(-scores, kth=min(k, scores.shape[1]) - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == np.asarray(y_true)[:, None], axis=1)))


def classification_metrics(y_true, y_pred, scores=None, classes=None) -> dict:
    """top1, top5 (None with <= 5 classes or no scores), balanced accuracy, macro-F1, per-class
    accuracy and the row-normalised confusion matrix. Labels are class ids 0..C-1."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n_classes = len(classes) if classes is not None else int(max(y_true.max(), y_pred.max()) + 1)
    classes = list(classes) if classes is not None else [str(c) for c in range(n_classes)]
    ids = np.arange(n_classes)
    counts = confusion_matrix(y_true, y_pred, labels=ids)
    support = counts.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        fractions = np.where(support[:, None] > 0, counts / np.maximum(support[:, None], 1), 0.0)
    per_class = {str(c): (float(fractions[i, i]) if support[i] else None) for i, c in enumerate(classes)}
    present = np.flatnonzero(support)
    top5 = None
    if scores is not None and n_classes > 5:
        top5 = top_k_accuracy(y_true, scores, 5)
    return {
        "top1": float(np.mean(y_true == y_pred)),
        "top5": top5,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(present) else None,
        "macro_f1": float(f1_score(y_true, y_pred, labels=ids[present], average="macro", zero_division=0)),
        "per_class_accuracy": per_class,
        "confusion_matrix": fractions.round(6).tolist(),
        "confusion_counts": counts.astype(int).tolist(),
        "n": int(len(y_true)),
    }
