"""Classification metrics of one scored split, as plain JSON-able values."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score, top_k_accuracy_score


def classification_metrics(y_true, y_pred, scores=None, classes=None) -> dict:
    """top1, top5 (None with <= 5 classes or no scores), balanced accuracy, macro-F1, per-class
    accuracy (None for a class absent from y_true) and the confusion matrix, row-normalised and in counts.

    Labels are class ids 0..C-1; score columns are those ids in order.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n_classes = len(classes) if classes is not None else int(max(y_true.max(), y_pred.max()) + 1)
    classes = list(classes) if classes is not None else [str(c) for c in range(n_classes)]
    ids = np.arange(n_classes)
    counts = confusion_matrix(y_true, y_pred, labels=ids)
    fractions = confusion_matrix(y_true, y_pred, labels=ids, normalize="true")  # absent classes: a row of 0
    support = counts.sum(axis=1)
    present = ids[support > 0]
    top5 = None
    if scores is not None and n_classes > 5:
        top5 = float(top_k_accuracy_score(y_true, scores, k=5, labels=ids))
    return {
        "top1": float(np.mean(y_true == y_pred)),
        "top5": top5,
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)) if len(present) else None,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class_accuracy": {str(c): (float(fractions[i, i]) if support[i] else None)
                               for i, c in enumerate(classes)},
        "confusion_matrix": fractions.round(6).tolist(),
        "confusion_counts": counts.astype(int).tolist(),
        "n": int(len(y_true)),
    }
