"""Few-shot curves: k-shot draws, selection inside the draw, t-intervals, files and the picture."""

import json

import numpy as np
import pytest
from PIL import Image

from extract.core.errors import UserError
from probe.protocol.data import ProbeData, load_probe_data, select_caches
from extract.store.catalog import CacheQuery
from probe.analyses.fewshot import (cv_select, fewshot, kshot_rows, load_fewshot, mean_ci, parse_shots, plot_fewshot,
                           write_fewshot)
from probe.heads.catalog import get_head
from probe.protocol.search import run_probe
from probe_helpers import blobs, toy_cache, toy_identity

T_975_DF2 = 4.302652729749464   # Student t quantiles, from tables: t(0.975, 2) and t(0.975, 4)
T_975_DF4 = 2.7764451051977987


def _blob_data(sep=0.8, n_per_class=80, n_classes=4, seed=0) -> ProbeData:
    """Overlapping blobs: 1-shot is hard, all rows are easy. 160 train, 40 val, 120 test rows."""
    X, y = blobs(n_per_class=n_per_class, n_classes=n_classes, dim=16, sep=sep, seed=seed)
    return ProbeData(X[:160], y[:160], X[160:200], y[160:200], X[200:], y[200:],
                     [f"c{i}" for i in range(n_classes)], toy_identity())


@pytest.fixture(scope="module")
def curve():
    """logreg on overlapping blobs, 1/2/5-shot and all, 5 draws."""
    return fewshot("logreg", _blob_data(), "1,2,5,all", seeds=5, progress=False)


# --- shots and draws ---------------------------------------------------------------------------

def test_parse_shots():
    assert parse_shots("1,2,5,10,20,all") == [1, 2, 5, 10, 20, None]
    assert parse_shots(" 5, 1,ALL,5 ") == [1, 5, None]
    assert parse_shots("all") == [None]
    assert parse_shots([10, None, 2]) == [2, 10, None]


@pytest.mark.parametrize("bad", ["", ",", "0", "-1", "1.5", "five", "1,,2", "2,al"])
def test_parse_shots_refuses(bad):
    with pytest.raises(UserError, match="--shots"):
        parse_shots(bad)


def test_kshot_rows_take_k_per_class_seeded():
    y = np.repeat([0, 1, 2], [30, 12, 3])
    rows = kshot_rows(y, 5, seed=0, draw=0)
    assert np.bincount(y[rows]).tolist() == [5, 5, 3]          # a short class keeps all it has
    assert np.array_equal(rows, kshot_rows(y, 5, seed=0, draw=0))
    assert not np.array_equal(rows, kshot_rows(y, 5, seed=0, draw=1))
    assert not np.array_equal(rows, kshot_rows(y, 5, seed=1, draw=0))
    assert np.array_equal(np.sort(rows), rows)
    # one ranking per draw: the 2-shot rows are among the 5-shot rows
    assert set(kshot_rows(y, 2, seed=0, draw=0)) <= set(rows)
    assert len({tuple(kshot_rows(y, 1, seed=0, draw=d)) for d in range(10)}) > 1


def test_cv_select_folds_and_one_shot_default():
    X, y = blobs(n_per_class=10, n_classes=3, dim=8, sep=3.0, seed=0)
    head = get_head("logreg")
    one = cv_select(head, X[kshot_rows(y, 1)], y[kshot_rows(y, 1)])
    assert one["params"] is None and one["n_splits"] == 0 and "builder defaults" in one["selection"]
    two = cv_select(head, X[kshot_rows(y, 2)], y[kshot_rows(y, 2)])
    assert two["n_splits"] == 2 and "2-fold" in two["selection"] and "C" in two["params"]
    assert cv_select(head, X[kshot_rows(y, 8)], y[kshot_rows(y, 8)])["n_splits"] == 5


# --- intervals ---------------------------------------------------------------------------------

def test_mean_ci_by_hand():
    out = mean_ci([0.8, 0.9, 1.0])
    assert out["mean"] == pytest.approx(0.9) and out["std"] == pytest.approx(0.1)
    assert out["ci95_halfwidth"] == pytest.approx(T_975_DF2 * 0.1 / np.sqrt(3), rel=1e-9)
    assert out["ci95_halfwidth"] == pytest.approx(0.248413771, rel=1e-8)
    assert out["ci95"] == pytest.approx([0.9 - 0.248413771, 0.9 + 0.248413771], rel=1e-8)
    assert mean_ci([0.7, 0.7, 0.7])["ci95_halfwidth"] == 0.0
    assert mean_ci([0.7])["ci95"] is None


def test_interval_is_zero_when_draws_agree():
    X, y = blobs(n_per_class=40, n_classes=3, dim=16, sep=6.0, seed=0)
    data = ProbeData(X[:80], y[:80], X[80:100], y[80:100], X[100:], y[100:], ["a", "b", "c"], toy_identity())
    res = fewshot("linear", data, "2,5", seeds=3, progress=False)
    for p in res["points"]:
        assert p["accuracies"] == [1.0, 1.0, 1.0]
        assert p["ci95_halfwidth"] == 0.0 and p["ci95"] == [1.0, 1.0] and p["std"] == 0.0


@pytest.mark.slow
def test_interval_is_positive_when_draws_disagree(curve):
    for p in curve["points"][:3]:
        acc = np.asarray(p["accuracies"])
        assert len(acc) == 5 and len(set(acc.tolist())) > 1
        s = np.sqrt(np.sum((acc - acc.mean()) ** 2) / 4)
        assert p["ci95_halfwidth"] > 0
        assert p["ci95_halfwidth"] == pytest.approx(T_975_DF4 * s / np.sqrt(5), rel=1e-9)
        assert p["ci95"] == pytest.approx([acc.mean() - p["ci95_halfwidth"], acc.mean() + p["ci95_halfwidth"]])


# --- the curve ---------------------------------------------------------------------------------

def test_accuracy_rises_from_one_shot_to_all(curve):
    assert curve["k"] == [1, 2, 5, None] and curve["shots"] == ["1", "2", "5", "all"]
    means = [p["mean"] for p in curve["points"]]
    assert means == sorted(means)
    assert means[0] < 0.7 and means[-1] > 0.9 and means[-1] - means[0] > 0.25
    # k rows of each of the 4 classes in every draw; all = every train+val row
    assert [p["n_train"] for p in curve["points"]] == [[4] * 5, [8] * 5, [20] * 5, [200]]


def test_selection_protocol_per_k(curve):
    one, two, five, full = curve["points"]
    assert one["hyperparameters"] == [{"C": 1.0, "scale": "standard"}] * 5
    assert all("builder defaults" in s for s in one["selection"]) and one["cv_top1"] == [None] * 5
    assert all("2-fold" in s for s in two["selection"]) and all("5-fold" in s for s in five["selection"])
    assert all(0 <= c <= 1 for c in two["cv_top1"] + five["cv_top1"])
    grid_C = {p["C"] for p in get_head("logreg").grid("fast", {})}
    assert {h["C"] for h in two["hyperparameters"] + five["hyperparameters"]} <= grid_C


def test_all_is_the_validation_protocol(curve):
    run = run_probe("logreg", _blob_data(), progress=False).result
    full = curve["points"][-1]
    assert full["accuracies"] == [run["metrics"]["top1"]] and full["mean"] == run["metrics"]["top1"]
    assert full["hyperparameters"] == [run["hyperparameters"]] and full["ci95"] is None


def test_same_seed_repeats_other_seed_differs(curve):
    data = _blob_data()
    again = fewshot("logreg", data, "1,2", seeds=5, progress=False)
    assert [p["accuracies"] for p in again["points"]] == [p["accuracies"] for p in curve["points"][:2]]
    other = fewshot("logreg", data, "1,2", seeds=5, seed=7, progress=False)
    assert [p["accuracies"] for p in other["points"]] != [p["accuracies"] for p in curve["points"][:2]]


@pytest.mark.slow
def test_test_labels_are_not_used_for_selection(curve):
    data = _blob_data()
    data.y_test = np.random.default_rng(3).permutation(data.y_test)
    scrambled = fewshot("logreg", data, "1,2,5,all", seeds=5, progress=False)
    for p, q in zip(curve["points"], scrambled["points"]):
        assert p["hyperparameters"] == q["hyperparameters"]
        assert p["cv_top1"] == q["cv_top1"] and p["selection"] == q["selection"]
    assert [p["accuracies"] for p in curve["points"]] != [q["accuracies"] for q in scrambled["points"]]


def test_short_classes_keep_their_rows(caplog):
    X, y = blobs(n_per_class=30, n_classes=3, dim=8, sep=4.0, seed=1)
    keep = (y != 2) | (np.cumsum(y == 2) <= 3)      # class 2: three rows in all
    X, y = X[keep], y[keep]
    data = ProbeData(X[:40], y[:40], X[40:50], y[40:50], X[50:], y[50:], ["a", "b", "c"], toy_identity())
    n_c2 = int(np.sum(np.concatenate([data.y_train, data.y_val]) == 2))
    res = fewshot("linear", data, "5", seeds=2, progress=False)
    p = res["points"][0]
    assert p["short_classes"] == ["c"] and p["n_train"] == [10 + n_c2] * 2
    assert all(f"{min(n_c2, 5)}-fold" in s for s in p["selection"])
    assert "fewer than 5" in caplog.text


def test_bad_arguments():
    data = _blob_data()
    with pytest.raises(UserError, match="seeds"):
        fewshot("logreg", data, "1", seeds=0)
    with pytest.raises(UserError, match="unknown head"):
        fewshot("logregg", data, "1")
    with pytest.raises(UserError, match="--shots"):
        fewshot("logreg", data, "1,x")
    with pytest.raises(UserError, match="--grid"):
        fewshot("logreg", data, "1", grid="huge")
    with pytest.raises(UserError, match="--scale"):
        fewshot("logreg", data, "1", scale="minmax")


# --- files -------------------------------------------------------------------------------------

def test_write_round_trip_and_png(tmp_path):
    toy_cache(tmp_path / "cache", n_per_class=20)
    data = load_probe_data(select_caches(CacheQuery(tmp_path / "cache")))
    res = fewshot("logreg", data, [1, 3, None], seeds=2, progress=False)
    assert res["identity"] == data.identity.to_dict() and res["layer"] == "penultimate"
    assert res["points"][1]["n_train"] == [9, 9]
    json_path, png_path = write_fewshot(res, tmp_path / "results")
    folder = data.identity.results_dir(tmp_path / "results", "penultimate")
    assert json_path == folder / "fewshot-logreg.json" and png_path == folder / "fewshot-logreg.png"
    assert json.loads(json_path.read_text()) == res == load_fewshot(json_path)
    with Image.open(png_path) as im:
        im.verify()
    with Image.open(png_path) as im:
        assert im.format == "PNG" and im.size[0] > 400 and len(im.convert("RGB").getcolors(1 << 20)) > 10
    assert not list(folder.glob(".*.tmp"))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(UserError, match="not a few-shot result"):
        load_fewshot(tmp_path / "other.json")


def test_plot_several_results(curve, tmp_path):
    other = fewshot("linear", _blob_data(), "1,2,5,all", seeds=2, progress=False)
    only_all = {**other, "label": "only all", "points": other["points"][-1:]}
    path = plot_fewshot([curve, other, only_all], tmp_path / "both.png", title="two heads")
    with Image.open(path) as im:
        im.load()
        assert im.format == "PNG"
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    # the first two curves are drawn in matplotlib's C0 blue and C1 orange
    for colour in ([31, 119, 180], [255, 127, 14]):
        assert np.any(np.all(np.abs(rgb.astype(int) - colour) < 8, axis=1))


# --- real features -----------------------------------------------------------------------------

@pytest.mark.slow
def test_digits_random_resnet20_curve(tmp_path):
    """Real CNN features (cifar_resnet20, random init, digits at their native 8x8: ~6 s on 2 busy cores)."""
    pytest.importorskip("torch")
    from extract.api import extract

    extract(model="cifar_resnet20", weights="none", data="digits", cache_dir=tmp_path, image_size=8,
            progress=False)
    data = load_probe_data(select_caches(CacheQuery(tmp_path)))
    res = fewshot("logreg", data, "1,5,all", seeds=3, progress=False)
    means = [p["mean"] for p in res["points"]]
    assert res["n_classes"] == 10 and [p["n_train"][0] for p in res["points"]] == [10, 50, 1347]
    assert means[0] < 0.5 < means[1] < 0.8 < means[2]      # measured: 0.379, 0.643, 0.889
    assert all(p["ci95_halfwidth"] > 0 for p in res["points"][:2])


@pytest.mark.slow
def test_probe_command_line_draws_the_curves(tmp_path, capsys):
    from probe.cli import main as probe_main
    from probe_helpers import toy_cache as make

    make(tmp_path / "cache", dataset="d", model="m1")
    make(tmp_path / "cache", dataset="d", model="m2", seed=2)
    assert probe_main(["--head", "logreg", "--model", "all", "--shots", "1,2,all", "--seeds", "3", "--cache-dir",
                       str(tmp_path / "cache"), "--results-dir", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert out.count("m1 · logreg") + out.count("m2 · logreg") >= 2 and "all: " in out
    assert (tmp_path / "r" / "d" / "fewshot.png").exists()
    saved = json.loads((tmp_path / "r" / "d" / "m1" / "penultimate" / "fewshot-logreg.json").read_text())
    assert saved["k"] == [1, 2, None] and len(saved["points"][0]["accuracies"]) == 3
