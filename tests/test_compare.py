"""Backbone comparison (probe.analyses.compare) on toy caches, and several models / every tap in one extract command."""

import json

import numpy as np
import pytest
from PIL import Image

from extract.store.cache import read_header, write_features
from extract.cli import main
from extract.core.errors import UserError
from extract.store.catalog import CacheQuery
from probe.analyses.compare import (choose_winner, compare, format_table, pivot, plot_layer_curve, select_feature_sets, tap_order,
                           write_comparison)
from probe_helpers import toy_identity, write_split

CLASSES = 3
LITE_TAPS = ["stage1", "stage2", "stage3", "stage4", "head_conv"]   # efficientnet_lite0's registry order


def points(split: str, sep: float, dim: int = 8, seed: int = 0):
    """Gaussian blobs around fixed centres (sep 0: pure noise); train 40 and test 20 rows per class."""
    centres = np.random.default_rng(123).normal(size=(CLASSES, dim)) * sep
    n = 40 if split == "train" else 20
    rng = np.random.default_rng([seed, split == "train"])
    y = np.repeat(np.arange(CLASSES), n)
    X = centres[y] + rng.normal(size=(len(y), dim))
    return X.astype(np.float32), y


def toy_backbone(cache, model: str, sep: float, dataset: str = "toy", seed: int = 0):
    for split in ("train", "test"):
        X, y = points(split, sep, seed=seed)
        write_split(cache, split, X, y, identity=toy_identity(dataset=dataset, model=model))


def multi_tap_backbone(cache, model: str = "efficientnet_lite0", taps: dict | None = None):
    """One file per split holding several taps (given in shuffled order: the file's order is not depth order)."""
    taps = taps or {"head_conv": 6.0, "penultimate": 4.0, "stage1": 0.0, "stage2": 0.8}
    for split in ("train", "test"):
        features, y = {}, None
        for i, (tap, sep) in enumerate(taps.items()):
            features[tap], y = points(split, sep, seed=i)
        prov = {"classes": [f"c{i}" for i in range(CLASSES)], "layers": list(features)}
        write_features(toy_identity(model=model), cache, split, features, y, None, prov)


@pytest.fixture
def three_backbones(tmp_path):
    cache = tmp_path / "cache"
    toy_backbone(cache, "toy_good", 6.0)
    toy_backbone(cache, "toy_weak", 0.7)
    toy_backbone(cache, "toy_noise", 0.0)
    return cache


def pairs(selections):
    return [(g.identity.model, tap) for g, tap in selections]


# --- selection ----------------------------------------------------------------------------------

def test_selection_orders_models_by_name_or_as_listed_then_taps_by_depth(three_backbones):
    cache = three_backbones
    multi_tap_backbone(cache)
    assert pairs(select_feature_sets(CacheQuery(cache))) == [("efficientnet_lite0", "penultimate"), ("toy_good", "penultimate"),
                                                 ("toy_noise", "penultimate"), ("toy_weak", "penultimate")]
    assert pairs(select_feature_sets(CacheQuery(cache, layer="all"))) == [
        ("efficientnet_lite0", "stage1"), ("efficientnet_lite0", "stage2"), ("efficientnet_lite0", "head_conv"),
        ("efficientnet_lite0", "penultimate"), ("toy_good", "penultimate"), ("toy_noise", "penultimate"),
        ("toy_weak", "penultimate")]
    assert pairs(select_feature_sets(CacheQuery(cache, model="toy_weak,toy_good"))) == [
        ("toy_weak", "penultimate"), ("toy_good", "penultimate")]
    assert pairs(select_feature_sets(CacheQuery(cache, model="all", layer="head_conv,stage1"))) == [
        ("efficientnet_lite0", "stage1"), ("efficientnet_lite0", "head_conv")]


def test_tap_order_follows_the_registry_else_the_files_order():
    assert tap_order("efficientnet_lite0", ["penultimate", "head_conv", "stage2", "stage1"]) == [
        "stage1", "stage2", "head_conv", "penultimate"]
    assert tap_order("resnet50.swav", ["layer4", "penultimate", "layer1"]) == ["layer1", "layer4", "penultimate"]
    assert tap_order("tinynet", ["b", "penultimate", "a"], stored=["penultimate", "b", "a"]) == ["b", "a", "penultimate"]


def test_unregistered_architecture_taps_keep_the_files_order(tmp_path):
    multi_tap_backbone(tmp_path, model="tinynet", taps={"blockB": 1.0, "blockA": 2.0, "penultimate": 3.0})
    assert [tap for _, tap in select_feature_sets(CacheQuery(tmp_path, layer="all"))] == ["blockB", "blockA", "penultimate"]


def test_several_datasets_need_a_choice_and_unknown_names_are_refused(three_backbones):
    toy_backbone(three_backbones, "toy_good", 6.0, dataset="other")
    with pytest.raises(UserError, match=r"2 datasets \(other, toy\).*--data"):
        select_feature_sets(CacheQuery(three_backbones))
    assert len(select_feature_sets(CacheQuery(three_backbones, data="other"))) == 1
    assert len(select_feature_sets(CacheQuery(three_backbones, data="toy"))) == 3
    with pytest.raises(UserError, match="no complete cache"):
        select_feature_sets(CacheQuery(three_backbones, data="toy", model="toy_good,resnet50"))
    with pytest.raises(UserError, match="layer4.*available: toy_good: penultimate"):
        select_feature_sets(CacheQuery(three_backbones, data="toy", model="toy_good", layer="layer4"))


def test_a_model_with_only_a_train_split_is_left_out(three_backbones):
    X, y = points("train", 6.0)
    write_split(three_backbones, "train", X, y, identity=toy_identity(model="toy_trainonly"))
    assert "toy_trainonly" not in {m for m, _ in pairs(select_feature_sets(CacheQuery(three_backbones)))}


# --- comparing ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_comparison_rows_are_the_result_files_and_the_winner_is_chosen_on_validation(three_backbones, tmp_path):
    results = tmp_path / "results"
    comparison = compare("linear,knn", select_feature_sets(CacheQuery(three_backbones)), results_dir=results, seed=0,
                         n_jobs=1, progress=False, save=False)
    rows = comparison.rows
    assert [(r["backbone"], r["head"]) for r in rows] == [(m, h) for m in ("toy_good", "toy_noise", "toy_weak")
                                                          for h in ("linear", "knn")]
    labels, heads, matrix = pivot(rows)
    assert labels == ["toy_good", "toy_noise", "toy_weak"] and heads == ["linear", "knn"]
    val_labels, _, val_matrix = pivot(rows, "val_top1")
    for r in rows:
        saved = json.loads(open(r["path"]).read())
        i, j = labels.index(r["backbone"]), heads.index(r["head"])
        assert saved["model"] == r["backbone"] and saved["head"] == r["head"]
        assert matrix[i, j] == saved["metrics"]["top1"] == r["test_top1"]
        chosen = {k: v for k, v in saved["hyperparameters"].items() if k != "scale"}
        assert val_matrix[i, j] == max(g["val_top1"] for g in saved["grid"] if g["params"] == chosen)
    # separated blobs are perfect, noise is near chance (3 classes), overlapping blobs in between
    assert matrix[0].tolist() == [1.0, 1.0]
    assert matrix[1].max() < 0.6 and 0.6 < matrix[2].max() < 1.0
    best_val = max(r["val_top1"] for r in rows)
    assert comparison.winner["val_top1"] == best_val == 1.0
    assert comparison.winner == next(r for r in rows if r["val_top1"] == best_val)   # ties: first in table order
    assert (comparison.winner["backbone"], comparison.winner["head"]) == ("toy_good", "linear")
    table = format_table(rows, comparison.winner)
    assert table.count("*") == 2   # the marked cell and the legend
    assert "100.00*" in next(line for line in table.splitlines() if line.startswith("toy_good"))
    assert comparison.folder == results / "toy"


def test_the_winner_is_chosen_on_validation_even_when_another_head_tests_higher(three_backbones, tmp_path):
    comparison = compare("linear,logreg", select_feature_sets(CacheQuery(three_backbones, model="toy_weak")),
                         results_dir=tmp_path / "results", n_jobs=1, progress=False, save=False)
    linear, logreg = comparison.rows
    assert linear["val_top1"] > logreg["val_top1"] and linear["test_top1"] < logreg["test_top1"]
    assert comparison.winner is linear
    assert "90.00*" in format_table(comparison.rows, comparison.winner)


def test_winner_rule_ignores_test_and_breaks_ties_by_table_order():
    rows = [{"label": "a", "tap": "penultimate", "head": "knn", "val_top1": 0.8, "test_top1": 0.99},
            {"label": "b", "tap": "penultimate", "head": "knn", "val_top1": 0.9, "test_top1": 0.70},
            {"label": "c", "tap": "penultimate", "head": "knn", "val_top1": 0.9, "test_top1": 0.95}]
    assert choose_winner(rows) is rows[1]
    assert choose_winner([]) is None


def test_write_comparison_writes_json_and_a_decodable_chart(three_backbones, tmp_path):
    comparison = compare(["knn"], select_feature_sets(CacheQuery(three_backbones, model="toy_noise,toy_good")),
                         results_dir=tmp_path / "results", n_jobs=1, progress=False, save=False)
    paths = write_comparison(comparison)
    assert set(paths) == {"json", "png"} and paths["json"].parent == tmp_path / "results" / "toy"
    saved = json.loads(paths["json"].read_text())
    assert saved["schema"] == "featprobe.compare/1" and saved["data"] == "toy"
    assert saved["rows"] == comparison.rows and saved["winner"]["backbone"] == "toy_good"
    with Image.open(paths["png"]) as im:
        im.load()
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert not (tmp_path / "results" / "toy" / "layers-curve.png").exists()


def test_layer_sweep_rows_follow_depth_and_write_a_layer_curve(tmp_path):
    cache = tmp_path / "cache"
    multi_tap_backbone(cache)
    toy_backbone(cache, "toy_good", 6.0)
    comparison = compare("knn", select_feature_sets(CacheQuery(cache, layer="all")), results_dir=tmp_path / "results",
                         n_jobs=1, progress=False, save=False)
    assert [(r["backbone"], r["tap"]) for r in comparison.rows] == [
        ("efficientnet_lite0", "stage1"), ("efficientnet_lite0", "stage2"), ("efficientnet_lite0", "head_conv"),
        ("efficientnet_lite0", "penultimate"), ("toy_good", "penultimate")]
    labels, _, matrix = pivot(comparison.rows)
    assert labels[0] == "efficientnet_lite0/stage1" and labels[-1] == "toy_good/penultimate"
    by_tap = dict(zip(labels, matrix[:, 0]))
    assert by_tap["efficientnet_lite0/stage1"] < 0.6 < by_tap["efficientnet_lite0/head_conv"] == 1.0
    for r in comparison.rows:  # each result landed under its own tap
        assert r["path"].endswith(f"/{r['backbone']}/{r['tap']}/knn.json")
    paths = write_comparison(comparison)
    assert paths["layers"] == tmp_path / "results" / "toy" / "layers-curve.png"
    assert paths["json"].name == "layers.json"   # a sweep never overwrites the backbone comparison
    for png in (paths["png"], paths["layers"], plot_layer_curve(comparison.rows, tmp_path / "curve.png")):
        with Image.open(png) as im:
            im.load()
            assert im.format == "PNG"


# --- extract: several models, every tap ---------------------------------------------------------

EXTRACT = ["--data", "synthetic", "--option", "n=16", "--no-progress"]


def test_extract_runs_several_models_with_every_tap_in_one_file(tmp_path, capsys):
    cache = tmp_path / "cache"
    args = ["--model", "cifar_resnet20.none,cifar_resnet32.none", "--layer", "all", *EXTRACT, "--cache-dir", str(cache)]
    assert main(args) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("Extracted") for line in out) == 2
    assert sum(line.strip().startswith(("train:", "test:")) for line in out) == 4
    files = sorted(cache.glob("**/*.h5"))
    assert [(f.parent.name, f.name) for f in files] == [(m, s) for m in ("cifar_resnet20.none", "cifar_resnet32.none")
                                                        for s in ("test.h5", "train.h5")]
    for f in files:
        header = read_header(f)
        assert header["complete"] and header["n_rows"] == 16
        assert header["identity"].taps == ("penultimate", "layer1", "layer2", "layer3")
        assert header["layers"] == ["layer1", "layer2", "layer3", "penultimate"]
    assert main(args) == 0   # everything is a hit now
    assert sum(line.startswith("Nothing to extract") for line in capsys.readouterr().out.splitlines()) == 2
    assert pairs(select_feature_sets(CacheQuery(cache, layer="all"))) == [
        (m, t) for m in ("cifar_resnet20.none", "cifar_resnet32.none") for t in ("layer1", "layer2", "layer3",
                                                                                  "penultimate")]


@pytest.mark.parametrize("model, layer, message", [
    ("cifar_resnet20.none,cifar_resnet2O", "all", "did you mean"),
    ("cifar_resnet20.none,cifar_resnet32.bogus", "all", "unknown weights 'bogus'"),
    ("cifar_resnet20.none,cifar_resnet32.none", "all,layr3", "unknown layer 'layr3'"),
])
def test_a_bad_name_in_the_lists_stops_before_any_work(tmp_path, capsys, model, layer, message):
    cache = tmp_path / "cache"
    assert main(["--model", model, "--layer", layer, *EXTRACT, "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not cache.exists() or not any(cache.rglob("*.h5*"))


@pytest.mark.slow
def test_probe_command_line_compares_every_backbone(tmp_path, capsys):
    from probe.cli import main as probe_main
    from probe_helpers import toy_cache as make

    make(tmp_path / "cache", dataset="d", model="good", seed=0)
    make(tmp_path / "cache", dataset="d", model="noisy", seed=1, n_per_class=20)
    assert probe_main(["--head", "logreg,knn", "--model", "all", "--cache-dir", str(tmp_path / "cache"),
                       "--results-dir", str(tmp_path / "r"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "chosen on validation" in out and (tmp_path / "r" / "d" / "compare.png").exists()
    saved = json.loads((tmp_path / "r" / "d" / "compare.json").read_text())
    assert {r["backbone"] for r in saved["rows"]} == {"good", "noisy"} and len(saved["rows"]) == 4
