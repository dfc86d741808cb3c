"""`--head retrieval`: cosine retrieval of test queries in the train+val gallery (probe.analyses.retrieval)."""

from extract.store.catalog import CacheQuery
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from probe.analyses.compare import compare, select_feature_sets
from probe.analyses.retrieval import metrics_per_query, retrieve, summarise
from probe.cli import main
from probe_helpers import toy_cache, write_split


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def at_angles(degrees):
    """Unit-free 2-D points at the given angles: cosine similarity to (1, 0) falls as the angle grows."""
    a = np.radians(np.asarray(degrees, float))
    return np.stack([np.cos(a), np.sin(a)], axis=1).astype(np.float32) * np.linspace(1, 3, len(a))[:, None]


def test_map_at_r_precision_and_recall_on_a_hand_made_gallery():
    # the query looks along 0 degrees; gallery sorted by angle: labels A B A A B C (A: R = 3)
    gallery = at_angles([50, 10, 60, 30, 20, 70])     # labels by angle: 10:B 20:B 30:A 50:A 60:A 70:C
    labels = np.array([0, 1, 0, 0, 1, 2])             # 0 = A, 1 = B, 2 = C
    per_query, nearest = retrieve(gallery, labels, at_angles([0]), np.array([0]), ks=(1, 2, 5))
    # ranked: 10 B, 20 B, 30 A, 50 A, 60 A, 70 C. R = 3: positions 1..3 hold B B A -> AP@R = (1/3) * (1/3)
    assert nearest.tolist() == [1]
    assert per_query["map@r"][0] == pytest.approx(1 / 9)
    assert per_query["recall@1"][0] == 0 and per_query["recall@2"][0] == 0 and per_query["recall@5"][0] == 1
    assert per_query["precision@5"][0] == pytest.approx(3 / 5)
    # a class B query: ranked B B A A A C, R = 2 -> AP@R = (1 + 1) / 2
    per_query, _ = retrieve(gallery, labels, at_angles([0]), np.array([1]), ks=(1,))
    assert per_query["map@r"][0] == 1.0
    # Musgrave et al.'s reading: hits at 1 and 3 of R = 4 -> (1 + 2/3) / 4, later hits ignored
    m = metrics_per_query(np.array([[0, 1, 0, 1, 0, 0]]), np.array([0]), np.array([4]), ks=(1,))
    assert m["map@r"][0] == pytest.approx((1 + 2 / 3) / 4)


def test_a_class_absent_from_the_gallery_is_a_miss_and_left_out_of_map():
    per_query, _ = retrieve(at_angles([0, 10, 20]), np.array([0, 0, 1]), at_angles([5, 5]), np.array([0, 2]),
                            ks=(1,))
    assert per_query["recall@1"].tolist() == [1.0, 0.0] and np.isnan(per_query["map@r"][1])
    summary = summarise(per_query, np.array([0, 2]), ["a", "b", "c"])
    assert summary["overall"]["map@r"] == 1.0 and summary["queries_without_gallery_match"] == 1
    assert summary["per_class"]["c"]["recall@1"] == 0.0 and summary["per_class"]["c"]["map@r"] is None
    assert summary["per_class"]["b"]["queries"] == 0 and summary["per_class"]["b"]["recall@1"] is None


@pytest.fixture
def digits_cache(tmp_path):
    """scikit-learn's digits as 'features' (64 pixel values): a real, offline, tie-free cosine geometry."""
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32) + np.random.default_rng(0).normal(scale=1e-3, size=X.shape).astype(np.float32)
    cut = 1300
    cache = tmp_path / "cache"
    classes = [str(i) for i in range(10)]
    write_split(cache, "train", X[:cut], y[:cut], classes=classes, dataset="digits-pixels", model="pixels")
    write_split(cache, "test", X[cut:], y[cut:], classes=classes, dataset="digits-pixels", model="pixels")
    return cache, (X[:cut], y[:cut], X[cut:], y[cut:])


def test_recall_at_1_is_the_accuracy_of_an_independent_1nn(digits_cache, tmp_path, capsys):
    cache, (Xtr, ytr, Xte, yte) = digits_cache
    code, out, err = run(["--head", "retrieval", "--cache-dir", cache, "--results-dir", tmp_path / "r",
                          "--no-progress"], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "r" / "digits-pixels" / "pixels" / "penultimate" / "retrieval.json").read_text())
    one_nn = KNeighborsClassifier(n_neighbors=1, metric="cosine", algorithm="brute").fit(Xtr, ytr)
    expected = float(np.mean(one_nn.predict(Xte) == yte))
    overall = result["metrics"]["retrieval"]["overall"]
    assert result["metrics"]["top1"] == overall["recall@1"] == pytest.approx(expected, abs=1e-12)
    assert 0.9 < expected < 1.0
    assert overall["recall@1"] <= overall["recall@5"] <= overall["recall@10"]
    assert overall["precision@10"] <= overall["precision@1"] and 0 < overall["map@r"] < overall["precision@1"]
    assert result["kind"] == "retrieval" and result["sizes"]["gallery"] == 1300 and overall["queries"] == 497
    per_class = result["metrics"]["retrieval"]["per_class"]
    for c in range(10):
        mask = yte == c
        assert per_class[str(c)]["recall@1"] == pytest.approx(np.mean(one_nn.predict(Xte[mask]) == c))
    assert "recall @1" in out and "mAP@R" in out
    assert not (tmp_path / "r" / "digits-pixels" / "pixels" / "penultimate" / "retrieval.joblib").exists()
    # streamed from the cache (as above the memory limit) gives the same numbers
    code, _, err = run(["--head", "retrieval", "--cache-dir", cache, "--results-dir", tmp_path / "s",
                        "--max-memory", "0.000001", "--no-progress"], capsys)
    assert code == 0, err
    streamed = json.loads((tmp_path / "s" / "digits-pixels" / "pixels" / "penultimate" / "retrieval.json").read_text())
    assert streamed["streamed"] and streamed["metrics"]["retrieval"]["overall"] == pytest.approx(overall)


def test_retrieval_is_opt_in_and_joins_the_comparison_pivot(tmp_path, capsys):
    toy_cache(tmp_path / "cache", dataset="d", model="good", seed=0)
    toy_cache(tmp_path / "cache", dataset="d", model="other", seed=1)
    comparison = compare("linear,retrieval", select_feature_sets(CacheQuery(tmp_path / "cache")), results_dir=tmp_path / "r",
                         n_jobs=1, progress=False, save=False)
    rows = [r for r in comparison.rows if r["head"] == "retrieval"]
    assert len(rows) == 2 and all(0 < r["val_top1"] <= 1 and 0 < r["test_top1"] <= 1 for r in rows)
    code, _, err = run(["--head", "all", "--model", "good", "--cache-dir", tmp_path / "cache", "--results-dir",
                        tmp_path / "all", "--no-progress", "--no-save"], capsys)
    assert code == 0, err
    assert not list((tmp_path / "all").glob("**/retrieval.json"))
    code, _, err = run(["--head", "retrival", "--cache-dir", tmp_path / "cache", "--model", "good"], capsys)
    assert code == 2 and "did you mean 'retrieval'" in err
    code, _, err = run(["samples", "--head", "retrieval", "--cache-dir", tmp_path / "cache", "--model", "good",
                        "--results-dir", tmp_path / "r"], capsys)
    assert code == 2 and "fits no head" in err and len(err.strip().splitlines()) == 1


def test_cuda_asked_for_where_there_is_none_is_one_error_line(tmp_path, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    toy_cache(tmp_path / "cache")
    code, _, err = run(["--head", "retrieval", "--device", "cuda", "--cache-dir", tmp_path / "cache",
                        "--results-dir", tmp_path / "r"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "CUDA is not available" in errors[0]
    assert not list((tmp_path / "r").glob("**/retrieval.json"))


@pytest.mark.cuda
def test_cuda_retrieval_equals_the_cpu(digits_cache, tmp_path, capsys):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cache, _ = digits_cache
    overall = {}
    for device in ("cpu", "cuda"):
        assert run(["--head", "retrieval", "--device", device, "--cache-dir", cache, "--results-dir",
                    tmp_path / device, "--no-progress"], capsys)[0] == 0
        saved = json.loads(next((tmp_path / device).glob("**/retrieval.json")).read_text())
        assert saved["device"].startswith(device)
        overall[device] = saved["metrics"]["retrieval"]["overall"]
    assert overall["cuda"] == pytest.approx(overall["cpu"])
