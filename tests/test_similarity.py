"""Linear CKA (probe.analyses.cka) against the dense kernel formulas, and `probe similarity` on caches."""

from extract.store.catalog import CacheQuery
import json

import numpy as np
import pytest
from PIL import Image

from extract.core.errors import UserError
from extract.store.cache import write_features
from probe.analyses.cka import cka_sums, linear_cka
from probe.analyses.similarity import pair_rows, pick_sides, similarity
from probe.cli import main
from probe_helpers import toy_identity


def dense_cka(X, Y, debiased=False):
    """CKA from N x N linear kernels: HSIC with the centring matrix H, or Song et al.'s unbiased HSIC
    on the raw kernels (diagonals zeroed), no centring of the features."""
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    n = len(X)

    def hsic(K, L):
        if not debiased:
            H = np.eye(n) - 1.0 / n
            return np.trace(K @ H @ L @ H)
        K, L = K.copy(), L.copy()
        np.fill_diagonal(K, 0)
        np.fill_diagonal(L, 0)
        one = np.ones(n)
        return (np.trace(K @ L) + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * one @ K @ L @ one) / (n * (n - 3))
    K, L = X @ X.T, Y @ Y.T
    return hsic(K, L) / np.sqrt(hsic(K, K) * hsic(L, L))


def related(n=60, dx=10, dy=7, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dx)) * rng.uniform(0.2, 3, dx) + 4.0
    Y = np.tanh(X @ rng.normal(size=(dx, dy))) + rng.normal(size=(n, dy)) - 2.0
    return X, Y


@pytest.mark.parametrize("debiased", [False, True])
def test_cka_is_one_for_identical_inputs_and_invariant_to_rotation_and_scale(debiased):
    X, Y = related()
    assert linear_cka(X, X, debiased) == pytest.approx(1.0, abs=1e-12)
    Q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(X.shape[1], X.shape[1])))
    base = linear_cka(X, Y, debiased)
    assert 0.05 < base < 0.95
    assert linear_cka(3.7 * X @ Q, Y, debiased) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X, 0.01 * Y, debiased) == pytest.approx(base, rel=1e-10)
    assert linear_cka(X @ Q + 5.0, Y, debiased) == pytest.approx(base, rel=1e-10)     # and to a shift


@pytest.mark.parametrize("debiased", [False, True])
@pytest.mark.parametrize("n, dx, dy", [(12, 30, 4), (60, 10, 7), (200, 3, 40)])
def test_blocked_cka_equals_the_dense_kernel_formula(debiased, n, dx, dy):
    X, Y = related(n, dx, dy, seed=n)
    expected = dense_cka(X, Y, debiased)
    for rows in (1, 7, n):
        assert linear_cka(X, Y, debiased, rows=rows) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_debiased_is_closer_to_zero_for_independent_wide_features():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(50, 400)), rng.normal(size=(50, 400))
    assert linear_cka(X, Y) > 0.7 and abs(linear_cka(X, Y, debiased=True)) < 0.1


def test_a_tap_matrix_holds_every_pair():
    X, Y = related(80, 6, 5)

    def blocks():
        return (({"a": X[s:s + 9], "b": X[s:s + 9] ** 2}, {"c": Y[s:s + 9]}) for s in range(0, 80, 9))
    m = cka_sums(blocks).matrix(debiased=True)
    assert m.shape == (2, 1)
    assert m[0, 0] == pytest.approx(dense_cka(X, Y, True)) and m[1, 0] == pytest.approx(dense_cka(X ** 2, Y, True))


# --- caches ---------------------------------------------------------------------------------------

CLASSES = ["c0", "c1", "c2"]


def backbone(cache, model, taps: dict, split="test", *, index=None, order=None, dataset="toy", fingerprint="fp"):
    """A cache file holding several taps; `order` permutes the stored rows (index travels with them)."""
    n = len(next(iter(taps.values())))
    y = np.arange(n) % 3
    index = np.arange(n) if index is None else np.asarray(index)
    order = np.arange(n) if order is None else np.asarray(order)
    prov = {"classes": CLASSES, "layers": list(taps)}
    feats = {t: np.asarray(X, np.float32)[order] for t, X in taps.items()}
    return write_features(toy_identity(dataset=dataset, model=model), cache, split, feats, y[order], index[order],
                          prov, fingerprint=fingerprint)


def tap_features(n=90, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, 12))
    return {"block1": base @ rng.normal(size=(12, 16)), "block2": np.maximum(base @ rng.normal(size=(12, 8)), 0),
            "penultimate": rng.normal(size=(n, 5)) + base[:, :5]}


def test_a_backbone_against_itself_has_ones_on_the_diagonal(tmp_path, capsys):
    backbone(tmp_path / "cache", "net", tap_features())
    code = main(["similarity", "--model", "net", "--layer", "all", "--cache-dir", str(tmp_path / "cache"),
                 "--results-dir", str(tmp_path / "r"), "--no-progress"])
    assert code == 0
    saved = json.loads((tmp_path / "r" / "toy" / "similarity-net.json").read_text())
    m = np.array(saved["cka"])
    assert saved["estimator"] == "debiased" and saved["n"] == 90 and saved["split"] == "test"
    assert saved["a"]["taps"] == saved["b"]["taps"] == ["block1", "block2", "penultimate"]
    assert np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T) and (m[~np.eye(3, dtype=bool)] < 0.99).all()
    assert np.allclose(np.diag(saved["biased"]), 1.0)
    out = capsys.readouterr().out
    assert "linear CKA (debiased)" in out and "wrote" in out
    with Image.open(tmp_path / "r" / "toy" / "similarity-net.png") as im:
        im.load()
        assert im.width > 100 and im.height > 100


def test_rows_pair_by_source_index_whatever_their_order(tmp_path):
    feats_a, feats_b = tap_features(seed=0), tap_features(seed=1)
    cache = tmp_path / "cache"
    backbone(cache, "a", feats_a)
    # b was stored shuffled and lost two images (skipped), so its rows hold indices in another order
    keep = np.setdiff1d(np.arange(90), [4, 50])
    order = np.random.default_rng(2).permutation(keep)
    backbone(cache, "b", {t: X for t, X in feats_b.items()}, order=order)
    a, b, split = pick_sides(CacheQuery(cache, model="a,b", layer="all"))
    assert split == "test" and a.taps == ["block1", "block2", "penultimate"]
    result = similarity(a, b, split=split, rows=16, progress=False)
    assert result.n == 88
    for i, ta in enumerate(a.taps):
        for j, tb in enumerate(b.taps):
            assert result.debiased[i, j] == pytest.approx(dense_cka(feats_a[ta][keep], feats_b[tb][keep], True))
            assert result.biased[i, j] == pytest.approx(dense_cka(feats_a[ta][keep], feats_b[tb][keep]))


def test_pair_rows_matches_equal_indices():
    pa, pb = pair_rows([5, 3, 9, 1], [9, 1, 7, 5])
    assert pa.tolist() == [0, 2, 3] and pb.tolist() == [3, 0, 1]


def test_features_of_different_images_are_refused_by_name(tmp_path):
    cache = tmp_path / "cache"
    backbone(cache, "a", tap_features())
    backbone(cache, "other", tap_features(), dataset="elsewhere")
    with pytest.raises(UserError, match="different images: the dataset differs \\(toy vs elsewhere\\)"):
        similarity(*pick_sides(CacheQuery(cache, model="a,other"))[:2], progress=False)
    changed = tmp_path / "changed"
    backbone(changed, "a", tap_features())
    backbone(changed, "b", tap_features(), fingerprint="another")
    with pytest.raises(UserError, match="different images: the images changed"):
        similarity(*pick_sides(CacheQuery(changed, model="a,b"))[:2], progress=False)
    relabelled = tmp_path / "relabelled"
    backbone(relabelled, "a", tap_features())
    backbone(relabelled, "b", tap_features(), index=np.roll(np.arange(90), 1))
    with pytest.raises(UserError, match="different labels"):
        similarity(*pick_sides(CacheQuery(relabelled, model="a,b"))[:2], progress=False)


@pytest.mark.parametrize("args, message", [(["--model", "a,b,c"], "compares two backbones"),
                                           (["--model", "a", "--estimator", "exact"], "invalid choice"),
                                           (["--model", "nope"], "no complete cache")])
def test_bad_input_is_one_error_line(tmp_path, capsys, args, message):
    backbone(tmp_path / "cache", "a", tap_features())
    assert main(["similarity", *args, "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
