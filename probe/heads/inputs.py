"""scikit-learn's input checks for the hand-written heads, where the rows are in memory.

Streamed rows (an h5py dataset or a Rows view of a cache) are not read here: they are checked
block by block as the head reads them (probe.protocol.rows).
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from probe.protocol.rows import is_streamed


def fit_inputs(estimator, X, y):
    """(X as float32, y as 1-D labels) checked as scikit-learn's own estimators check them."""
    if is_streamed(X):
        y = column_or_1d(y, warn=True)
    else:
        X, y = validate_data(estimator, X, y, dtype=np.float32)
    check_classification_targets(y)
    if len(y) != len(X):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    return X, y


def predict_inputs(estimator, X, fitted: str):
    """X checked against what `estimator` was fit on (its `fitted` attribute must exist)."""
    check_is_fitted(estimator, fitted)
    return X if is_streamed(X) else validate_data(estimator, X, dtype=np.float32, reset=False)
