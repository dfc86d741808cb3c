"""Real ImageNet weights on real images: the features separate ants from bees."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from extract import load_features

pytestmark = pytest.mark.slow


def test_lite0_features_of_ants_bees_reach_93_percent_with_logistic_regression(lite0_hymenoptera):
    # found by the request, not by a path: the folder's label carries a hash of where it lives
    train = load_features(data="hymenoptera_data", model="efficientnet_lite0", split="train", cache_dir=lite0_hymenoptera)
    val = load_features(data="hymenoptera_data", model="efficientnet_lite0", split="val", cache_dir=lite0_hymenoptera)
    assert train.X.shape == (245, 1280) and val.X.shape == (153, 1280)
    assert train.meta["classes"] == ["ants", "bees"]
    assert train.meta["provenance"]["preprocess"]["mean"] == pytest.approx([127 / 255] * 3, abs=1e-3)
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)).fit(train.X, train.y)
    accuracy = float(np.mean(clf.predict(val.X) == val.y))
    assert accuracy >= 0.93, accuracy
