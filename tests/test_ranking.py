"""`probe rank`: transferability scores of every cached backbone/tap and their agreement with probe results."""

from extract.store.catalog import CacheQuery
import json

import numpy as np
import pytest
from PIL import Image
from scipy.stats import kendalltau

from extract.core.errors import UserError
from probe.analyses.compare import select_feature_sets
from probe.analyses.ranking import kendall, rank
from probe.analyses.transfer import scores_of_file
from probe.cli import main
from probe_helpers import toy_identity, write_split


def points(split, sep, n_classes=4, dim=10, seed=0):
    centres = np.random.default_rng(123).normal(size=(n_classes, dim)) * sep
    n = 50 if split == "train" else 25
    rng = np.random.default_rng([seed, split == "train"])
    y = np.repeat(np.arange(n_classes), n)
    return (centres[y] + rng.normal(size=(len(y), dim)) + 2.0).astype(np.float32), y


def toy(cache, model, sep, test_nan=False, **identity):
    for split in ("train", "test"):
        X, y = points(split, sep)
        if split == "test" and test_nan:
            X[:] = np.nan
        write_split(cache, split, X, y, identity=toy_identity(model=model, **identity))


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def three(tmp_path):
    cache = tmp_path / "cache"
    toy(cache, "good", 3.0)
    toy(cache, "weak", 0.6)
    toy(cache, "noise", 0.0)
    return cache


def test_scores_rank_planted_structure_and_agree_with_measured_accuracy(three, tmp_path, capsys):
    results = tmp_path / "results"
    code, _, err = run(["--head", "linear", "--model", "all", "--cache-dir", three, "--results-dir", results,
                        "--no-progress", "--no-save"], capsys)
    assert code == 0, err
    code, out, err = run(["rank", "--head", "linear", "--cache-dir", three, "--results-dir", results,
                          "--no-progress"], capsys)
    assert code == 0, err
    assert "train split only" in out
    lines = [line.split() for line in out.splitlines()[2:5]]
    assert [line[1] for line in lines] == ["good", "weak", "noise"]
    saved = json.loads((results / "toy" / "rank.json").read_text())
    assert saved["schema"] == "featprobe.rank/1" and saved["split"] == "train"
    rows = saved["rows"]
    assert [r["backbone"] for r in rows] == ["good", "weak", "noise"]
    assert [r["hscore_rank"] for r in rows] == [1, 2, 3] and all(r["n"] == 200 for r in rows)
    for r in rows:   # the measured top-1 is the result file's
        measured = json.loads(open(r["result"]).read())
        assert measured["model"] == r["backbone"] and measured["metrics"]["top1"] == r["test_top1"]
    tops = [r["test_top1"] for r in rows]
    assert tops[0] > tops[1] > tops[2]
    for score in ("logme", "hscore"):
        c = saved["correlation"][score]
        assert c["n"] == 3 and c["tau"] == pytest.approx(kendalltau([r[score] for r in rows], tops)[0]) == 1.0
    assert "Kendall's tau, LogME vs linear test top-1: +1.000" in out
    with Image.open(results / "toy" / "rank.png") as im:
        im.load()
        assert im.width > 300 and im.height > 100


def test_only_the_train_split_is_read(tmp_path):
    cache = tmp_path / "cache"
    toy(cache, "good", 3.0, test_nan=True)    # a probe would refuse these test features
    toy(cache, "noise", 0.0, test_nan=True)
    ranking = rank(select_feature_sets(CacheQuery(cache)), results_dir=tmp_path / "r", progress=False)
    assert [r["backbone"] for r in ranking.rows] == ["good", "noise"]
    assert all(np.isfinite(r["logme"]) for r in ranking.rows)
    assert ranking.rows[0]["test_top1"] is None
    assert ranking.correlation["logme"]["tau"] is None and "at least two" in ranking.correlation["logme"]["reason"]


def test_results_of_another_extraction_or_head_are_not_matched(three, tmp_path, capsys):
    results = tmp_path / "results"
    toy(three, "good", 3.0, precision="bf16", precision_requested="bf16")   # the same model, another identity
    assert run(["--head", "linear", "--model", "good", "--precision", "bf16", "--cache-dir", three,
                "--results-dir", results, "--no-progress", "--no-save"], capsys)[0] == 0
    ranking = rank(select_feature_sets(CacheQuery(three, precision="fp32")), results_dir=results, head="linear",
                   progress=False)
    assert all(r["test_top1"] is None for r in ranking.rows)
    ranking = rank(select_feature_sets(CacheQuery(three, precision="bf16")), results_dir=results, head="linear",
                   progress=False)
    assert ranking.rows[0]["test_top1"] is not None
    assert rank(select_feature_sets(CacheQuery(three, precision="bf16")), results_dir=results, head="knn",
                progress=False).rows[0]["test_top1"] is None


def test_kendall_needs_two_distinct_pairs():
    assert kendall([{"s": 1.0, "test_top1": 0.5}], "s")["tau"] is None
    flat = kendall([{"s": 1.0, "test_top1": 0.5}, {"s": 2.0, "test_top1": 0.5}], "s")
    assert flat["tau"] is None and "all equal" in flat["reason"]
    assert kendall([{"s": 1.0, "test_top1": 0.9}, {"s": 2.0, "test_top1": 0.5}], "s")["tau"] == -1.0


def test_bad_input_is_one_error_line(three, capsys):
    for args, message in ((["rank", "--head", "logreg,knn"], "one head"), (["rank", "--head", "nope"], "unknown head"),
                          (["rank", "--model", "absent"], "no complete cache"),
                          (["rank", "--features", "x.h5"], "--features is not used")):
        code, _, err = run([*args, "--cache-dir", three, "--no-progress"], capsys)
        assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    with pytest.raises(UserError, match="nothing to rank"):
        rank([])


@pytest.mark.slow
def test_correlation_table_on_real_digits_features(tmp_path, capsys):
    """A random-init CIFAR ResNet-20 on scikit-learn's digits, every tap: scores against logreg's accuracy."""
    from extract import extract

    cache, results = tmp_path / "cache", tmp_path / "results"
    extract(model="cifar_resnet20", weights="none", data="digits",
            layers=("penultimate", "layer1", "layer2", "layer3"), cache_dir=cache, progress=False)
    code, _, err = run(["--head", "logreg", "--model", "cifar_resnet20.none", "--layer", "all", "--cache-dir", cache,
                        "--results-dir", results, "--no-progress", "--no-save", "--n-jobs", "1"], capsys)
    assert code == 0, err
    code, out, err = run(["rank", "--model", "all", "--layer", "all", "--cache-dir", cache, "--results-dir", results,
                          "--no-progress"], capsys)
    assert code == 0, err
    saved = json.loads((results / "digits" / "rank.json").read_text())
    rows = {r["tap"]: r for r in saved["rows"]}
    assert set(rows) == {"layer1", "layer2", "layer3", "penultimate"}
    assert all(r["n"] == 1347 and r["test_top1"] is not None for r in rows.values())    # the 75% train split
    train = cache / "digits" / "cifar_resnet20.none" / "train.h5"
    assert rows["layer2"]["logme"] == pytest.approx(scores_of_file(train, "layer2")["logme"], rel=1e-9)
    # the shallowest tap (16 dims) scores lowest on both and is the least accurate
    for score in ("logme", "hscore"):
        assert rows["layer1"][score] < min(rows[t][score] for t in ("layer2", "layer3", "penultimate"))
    assert rows["layer1"]["test_top1"] < rows["penultimate"]["test_top1"]
    for score in ("logme", "hscore"):
        ordered = saved["rows"]
        expected = kendalltau([r[score] for r in ordered], [r["test_top1"] for r in ordered])[0]
        assert saved["correlation"][score]["n"] == 4
        assert saved["correlation"][score]["tau"] == pytest.approx(expected) and expected > 0
    assert "Kendall's tau, LogME vs logreg test top-1: +" in out
