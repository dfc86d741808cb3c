"""Validation carving, selection that never reads test labels, warm-started logistic-regression path."""

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from probe.protocol.data import ProbeData, load_probe_data, select_caches
from extract.store.catalog import CacheQuery
from probe.protocol.search import run_probe, search
from probe.protocol.splits import carve, holdout_mask, stratified_subsample, validation_mask
from probe_helpers import blobs, toy_cache, toy_identity


def test_validation_mask_is_stratified_and_seeded():
    labels = np.repeat([0, 1, 2], [50, 30, 5])
    index = np.arange(len(labels)) * 3 + 7
    m = validation_mask(index, labels, seed=0)
    assert [int(m[labels == c].sum()) for c in range(3)] == [10, 6, 1]
    assert np.array_equal(m, validation_mask(index, labels, seed=0))
    assert not np.array_equal(m, validation_mask(index, labels, seed=1))


def test_validation_mask_depends_on_source_index_not_row_order():
    labels = np.repeat([0, 1], 40)
    index = np.arange(80)
    perm = np.random.default_rng(0).permutation(80)
    m = validation_mask(index, labels)
    assert np.array_equal(validation_mask(index[perm], labels[perm]), m[perm])


def test_validation_mask_keeps_both_sides_of_tiny_classes():
    labels = np.array([0, 0, 1, 1, 1, 2])
    m = validation_mask(np.arange(6), labels)
    assert m[labels == 0].sum() == 1 and (~m)[labels == 0].sum() == 1
    assert not m[labels == 2].any()


def test_stratified_subsample_keeps_proportions():
    labels = np.repeat([0, 1], [300, 100])
    keep = stratified_subsample(np.arange(400), labels, 100, seed=0)
    assert len(keep) == 100 and (labels[keep] == 0).sum() == 75


def _data(seed=0, flip=0.15):
    X, y = blobs(n_per_class=60, n_classes=3, dim=10, sep=1.2, seed=seed)
    rng = np.random.default_rng(seed)
    noisy = rng.random(len(y)) < flip
    y = np.where(noisy, rng.integers(0, 3, len(y)), y)
    return ProbeData(X[:100], y[:100], X[100:140], y[100:140], X[140:], y[140:], ["a", "b", "c"], toy_identity())


@pytest.mark.parametrize("head", ["logreg", "svm", "knn"])
def test_scrambled_test_labels_change_score_not_selection(head):
    data = _data()
    first = run_probe(head, data, progress=False).result
    rng = np.random.default_rng(1)
    data.y_test = rng.permutation(data.y_test) if head != "knn" else (data.y_test + 1) % 3
    second = run_probe(head, data, progress=False).result
    assert first["hyperparameters"] == second["hyperparameters"]
    def scores(r):
        return [(g["params"], g["val_top1"]) for g in r["grid"]]
    assert scores(first) == scores(second)
    assert first["metrics"]["top1"] != second["metrics"]["top1"]


def test_warm_path_selects_what_fresh_fits_select():
    d = _data(seed=3, flip=0.2)  # label noise: not separable, so every C has one optimum
    Xtr, ytr, Xva, yva = d.X_train, d.y_train, d.X_val, d.y_val
    found = search("logreg", Xtr, ytr, Xva, yva, grid="paper", progress=False)
    sc = StandardScaler().fit(Xtr)
    fresh = []
    with threadpool_limits(1):
        for row in found.grid:
            est = LogisticRegression(C=row["params"]["C"], max_iter=5000, tol=1e-7).fit(sc.transform(Xtr), ytr)
            fresh.append(np.mean(est.predict(sc.transform(Xva)) == yva))
    warm = [row["val_top1"] for row in found.grid]
    assert np.mean(np.isclose(warm, fresh)) >= 0.9
    assert max(warm) == pytest.approx(max(fresh))


def test_fast_logreg_grid_refines_around_winner():
    X, y = blobs(n_per_class=60, n_classes=3, dim=10, sep=1.0, seed=3)
    found = search("logreg", X[:120], y[:120], X[120:], y[120:], grid="fast", progress=False)
    Cs = [g["params"]["C"] for g in found.grid]
    assert len(Cs) > 12 and len(set(Cs)) == len(Cs)
    assert Cs[:12] == sorted(Cs[:12])


def test_two_split_dataset_uses_val_as_test(tmp_path):
    toy_cache(tmp_path, splits=("train", "val"))
    data = load_probe_data(select_caches(CacheQuery(tmp_path)))
    assert data.test_split == "val"
    assert "no test split" in data.validation
    assert data.sizes["train"] + data.sizes["val"] == 120


def test_three_split_dataset_uses_its_own_val(tmp_path):
    toy_cache(tmp_path, splits=("train", "val", "test"))
    data = load_probe_data(select_caches(CacheQuery(tmp_path)))
    assert data.test_split == "test" and data.validation == "the dataset's own 'val' split"
    assert data.sizes == {"train": 120, "val": 60, "test": 60}


def test_holdout_mask_is_not_the_validation_mask_at_the_same_seed():
    labels = np.repeat([0, 1], 100)
    test, val = holdout_mask(np.arange(200), labels, seed=0), validation_mask(np.arange(200), labels, seed=0)
    assert test.sum() == val.sum() == 40 and (test & val).sum() < 20


def test_carve_takes_test_first_and_the_validation_seed_never_moves_it():
    labels = np.repeat([0, 1, 2], [50, 30, 5])
    index = np.arange(len(labels)) * 2 + 1
    test, val = carve(index, labels, seed=0, test_fraction=0.2, split_seed=7)
    assert [int(test[labels == c].sum()) for c in range(3)] == [10, 6, 1] and not (test & val).any()
    assert [int(val[labels == c].sum()) for c in range(3)] == [8, 5, 1]        # 20% of the 40, 24, 4 left
    test2, val2 = carve(index, labels, seed=1, test_fraction=0.2, split_seed=7)
    assert np.array_equal(test, test2) and not np.array_equal(val, val2)
    perm = np.random.default_rng(0).permutation(len(labels))
    test3, val3 = carve(index[perm], labels[perm], seed=0, test_fraction=0.2, split_seed=7)
    assert np.array_equal(test3, test[perm]) and np.array_equal(val3, val[perm])
    assert not carve(index, labels, test_fraction=None)[0].any()


def test_train_only_cache_carves_disjoint_test_rows_and_says_so(tmp_path):
    toy_cache(tmp_path, splits=("train",))          # 120 rows, 3 classes of 40
    data = load_probe_data(select_caches(CacheQuery(tmp_path)), seed=0, test_fraction=0.25, split_seed=3)
    assert data.sizes == {"train": 72, "val": 18, "test": 30} and data.test_split == "train"
    roles = [set(data.index_train), set(data.index_val), set(data.index_test)]
    assert sum(map(len, roles)) == 120 and len(set.union(*roles)) == 120
    assert data.test["description"] == "25% of train carved by split seed 3, 30 rows"
    assert data.test["carved"] == {"fraction": 0.25, "split_seed": 3}
    assert "only a train split" in data.validation and "the rest of train" in data.validation
    again = load_probe_data(select_caches(CacheQuery(tmp_path)), seed=5, test_fraction=0.25, split_seed=3)
    assert np.array_equal(np.sort(again.index_test), np.sort(data.index_test))
    lazy = load_probe_data(select_caches(CacheQuery(tmp_path)), lazy=True, test_fraction=0.25, split_seed=3)
    assert np.array_equal(np.asarray(lazy.X_test), data.X_test)
    r = run_probe("logreg", data, progress=False).result
    assert r["test"]["rows"] == 30 and r["sizes"]["test"] == 30 and r["sources"]["test"] == r["sources"]["train"]


def test_a_dataset_with_its_own_test_split_keeps_it(tmp_path):
    toy_cache(tmp_path, splits=("train", "test"))
    data = load_probe_data(select_caches(CacheQuery(tmp_path)), test_fraction=0.5)
    assert data.test_carve is None and data.sizes["test"] == 60 and data.sizes["train"] + data.sizes["val"] == 120
    assert data.test["description"] == "the dataset's own 'test' split, 60 rows"


def test_max_search_samples_subsamples_the_search_only():
    data = _data(flip=0.0)
    r = run_probe("svm-rbf", data, max_search_samples=30, progress=False).result
    assert r["sizes"]["search_train"] == 30 and r["sizes"]["train"] == 100
    assert "subsample" in r["validation"]


def test_expensive_search_warns_and_names_the_flag(caplog):
    from dataclasses import replace

    from probe.heads.catalog import HEADS
    slow_rf = replace(HEADS["rf"], seconds_per_fit=lambda params, stats: 1e4)
    X, y = blobs(n_per_class=20, n_classes=2, dim=4)
    with caplog.at_level("WARNING", logger="probe"):
        search(slow_rf, X[:30], y[:30], X[30:], y[30:], progress=False)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and "may take" in said[0] and "--max-search-samples" in said[0]
