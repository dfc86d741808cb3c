"""Result JSON schema, saved-head round trip and version check, report collation."""

import json
import warnings

import numpy as np
import pytest

from extract.errors import UserError
from probe.data import load_probe_data, select_caches
from probe.metrics import classification_metrics
from probe.protocol import run_probe
from probe.report import collect_rows, format_rows, write_report
from probe.results import SCHEMA, SklearnVersionWarning, load_head, load_results, save_head, write_result
from probe_helpers import toy_cache

RESULT_KEYS = {"schema", "kind", "head", "dataset", "model", "weights", "layer", "metrics", "hyperparameters", "grid",
               "timing", "sizes", "validation", "test_split", "provenance", "versions", "seed", "created"}
METRIC_KEYS = {"top1", "top5", "balanced_accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix"}


@pytest.fixture(scope="module")
def logreg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    toy_cache(root, splits=("train", "test"), n_classes=7, dim=12)
    data = load_probe_data(select_caches(root))
    return run_probe("logreg", data, progress=False)


def test_result_schema(logreg_run, tmp_path):
    r = logreg_run.result
    path = write_result(r, tmp_path)
    assert path == tmp_path / "toy" / "tinynet" / "penultimate" / "logreg.json"
    assert (path.parent / "logreg.confusion.png").stat().st_size > 0
    saved = json.loads(path.read_text())
    assert RESULT_KEYS <= set(saved) and saved["schema"] == SCHEMA and saved["kind"] == "probe"
    assert METRIC_KEYS <= set(saved["metrics"])
    assert saved["metrics"]["top5"] is not None  # 7 classes
    assert set(saved["timing"]) >= {"fit_seconds", "predict_seconds"}
    assert saved["sizes"]["test"] == 140
    assert all(set(g) >= {"params", "val_top1"} for g in saved["grid"])
    assert saved["hyperparameters"]["C"] in [g["params"]["C"] for g in saved["grid"]]
    assert saved["provenance"]["model"] == "tinynet" and "sklearn" in saved["versions"]
    assert "20% of train" in saved["validation"]


def test_metrics_values():
    m = classification_metrics([0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0], classes=["a", "b", "c"])
    assert m["top1"] == pytest.approx(4 / 6) and m["top5"] is None
    assert m["per_class_accuracy"] == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert m["confusion_matrix"][0] == [0.5, 0.5, 0.0]
    scores = -np.eye(7)  # the true class ranks last: top-5 misses every row
    assert classification_metrics(np.arange(7), np.arange(7), scores, list("abcdefg"))["top5"] == 0.0


def test_saved_head_round_trip(logreg_run, tmp_path):
    path = save_head(logreg_run.pipeline, logreg_run.result, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SklearnVersionWarning)
        pipe, sidecar = load_head(path)
    X = np.random.default_rng(0).normal(size=(5, 12)).astype(np.float32)
    assert np.array_equal(pipe.predict(X), logreg_run.pipeline.predict(X))
    assert sidecar["classes"] == logreg_run.result["classes"] and sidecar["head"] == "logreg"


def test_saved_head_version_mismatch_warns(logreg_run, tmp_path):
    path = save_head(logreg_run.pipeline, logreg_run.result, tmp_path)
    side = path.with_name(path.name + ".json")
    meta = json.loads(side.read_text())
    meta["sklearn"] = "0.24.2"
    side.write_text(json.dumps(meta))
    with pytest.warns(SklearnVersionWarning, match="scikit-learn 0.24.2"):
        load_head(path)


def test_head_without_sidecar_is_refused(logreg_run, tmp_path):
    path = save_head(logreg_run.pipeline, logreg_run.result, tmp_path)
    path.with_name(path.name + ".json").unlink()
    with pytest.raises(UserError, match="sidecar"):
        load_head(path)


def test_report_collates_probe_and_finetune(logreg_run, tmp_path):
    write_result(logreg_run.result, tmp_path, confusion_png=False)
    finetune = {"schema": SCHEMA, "kind": "finetune", "head": "finetune-all", "dataset": "toy", "model": "tinynet",
                "layer": "penultimate", "metrics": {"top1": 0.99, "balanced_accuracy": 0.98, "macro_f1": 0.97},
                "timing": {"fit_seconds": 12.5}, "epochs": 3, "history": []}
    folder = tmp_path / "toy" / "tinynet" / "penultimate"
    (folder / "finetune-all.json").write_text(json.dumps(finetune))
    (folder / "unrelated.json").write_text(json.dumps({"hello": 1}))
    assert len(load_results(tmp_path)) == 2
    rows = collect_rows(tmp_path)
    assert [r["kind"] for r in rows] == ["probe", "finetune"]
    assert rows[1]["top1"] == 0.99 and rows[1]["fit_s"] == 12.5
    md = format_rows(rows, "markdown")
    assert "| finetune | finetune-all | toy | tinynet | penultimate | 99.00 | 98.00 | 97.00 | 12.50 |" in md
    rows, paths = write_report(tmp_path)
    assert "finetune-all" in paths["csv"].read_text() and paths["png"].stat().st_size > 0
    assert paths["markdown"].read_text() == md
