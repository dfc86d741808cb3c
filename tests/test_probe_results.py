"""Result JSON schema, saved-head round trip and version check, report collation."""

import errno
import hashlib
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import skops.io as sio
from sklearn.pipeline import Pipeline

from extract.core.errors import UserError, guarded
from probe.protocol.data import load_probe_data, select_caches
from extract.store.catalog import CacheQuery
from probe.protocol.metrics import classification_metrics
from probe.protocol.search import run_probe
from probe.output.report import collect_rows, format_rows, write_report
from probe.output.headfile import SklearnVersionWarning, load_head, save_head
from probe.output.results import SCHEMA, load_results, write_result
from probe_helpers import blobs, toy_cache

RESULT_KEYS = {"schema", "kind", "head", "dataset", "model", "identity", "precision", "dtype", "layer", "metrics",
               "hyperparameters", "grid", "timing", "sizes", "validation", "test_split", "provenance", "versions", "seed", "created"}
METRIC_KEYS = {"top1", "top5", "balanced_accuracy", "macro_f1", "per_class_accuracy", "confusion_matrix"}


@pytest.fixture(scope="module")
def logreg_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    toy_cache(root, splits=("train", "test"), n_classes=7, dim=12)
    data = load_probe_data(select_caches(CacheQuery(root)))
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


def test_metrics_with_a_class_absent_from_the_test_split():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 6, 200)  # class 6 of 7 never occurs
    scores = rng.random((200, 7))
    m = classification_metrics(y, scores[:, :6].argmax(1), scores, list("abcdefg"))
    rank = (scores > scores[np.arange(200), y][:, None]).sum(1)  # how many classes score above the true one
    assert m["top5"] == pytest.approx(np.mean(rank < 5))
    assert m["per_class_accuracy"]["g"] is None and m["confusion_matrix"][6] == [0.0] * 7
    assert np.array(m["confusion_counts"]).sum() == m["n"] == 200
    assert np.allclose(np.array(m["confusion_matrix"])[:6].sum(1), 1)
    assert m["per_class_accuracy"]["a"] == pytest.approx(np.mean(scores[y == 0, :6].argmax(1) == 0), abs=1e-6)


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
                "precision": "fp32", "dtype": "float32",
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
    assert "| finetune | finetune-all | toy | tinynet | penultimate | fp32 | float32 | - | 99.00 | 98.00 | 97.00 | 12.50 |" in md
    rows, paths = write_report(tmp_path)
    assert "finetune-all" in paths["csv"].read_text() and paths["png"].stat().st_size > 0
    assert paths["markdown"].read_text() == md


def _fill(folder):
    with open(folder / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC


def _listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_full_disk_is_a_user_error_and_keeps_earlier_results(logreg_run, tiny_disk, capsys):
    r = logreg_run.result
    path = write_result(r, tiny_disk, confusion_png=False)
    before = path.read_bytes()
    _fill(tiny_disk)
    listing = _listing(tiny_disk)
    for write in (lambda: write_result({**r, "seed": 1}, tiny_disk),
                  lambda: save_head(logreg_run.pipeline, r, tiny_disk)):
        with pytest.raises(UserError, match=r"could not write .*(logreg\.json|logreg\.skops): "
                                             r"No space left on device; .*intact"):
            write()
    assert _listing(tiny_disk) == listing, "no temp file and no truncated head left"
    assert path.read_bytes() == before and load_results(tiny_disk)[0]["head"] == "logreg"
    assert guarded(lambda: save_head(logreg_run.pipeline, r, tiny_disk)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not write") and len(err.strip().splitlines()) == 1


def test_full_disk_keeps_a_saved_head(logreg_run, tiny_disk):
    path = save_head(logreg_run.pipeline, logreg_run.result, tiny_disk)
    head, side = path.read_bytes(), path.with_name(path.name + ".json").read_bytes()
    _fill(tiny_disk)
    with pytest.raises(UserError, match="No space left"):
        save_head(logreg_run.pipeline, {**logreg_run.result, "created": "later"}, tiny_disk)
    assert path.read_bytes() == head and path.with_name(path.name + ".json").read_bytes() == side
    assert sorted(p.name for p in path.parent.iterdir()) == ["logreg.skops", "logreg.skops.json"]
    load_head(path)


class _FailsWhenSaved:
    """Raises while its state is gathered, after the array before it in the dump was."""

    def __getstate__(self):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_failure_mid_dump_keeps_the_previous_head(logreg_run, tmp_path):
    path = save_head(logreg_run.pipeline, logreg_run.result, tmp_path)
    head, side = path.read_bytes(), path.with_name(path.name + ".json").read_bytes()
    big = [np.arange(100_000.0), _FailsWhenSaved()]  # the array is written before the failure
    with pytest.raises(UserError, match=r"logreg\.skops: No space left on device"):
        save_head(big, {**logreg_run.result, "created": "later"}, tmp_path)
    assert path.read_bytes() == head and path.with_name(path.name + ".json").read_bytes() == side
    assert sorted(p.name for p in path.parent.iterdir()) == ["logreg.skops", "logreg.skops.json"]
    pipe, _ = load_head(path)
    assert list(pipe.classes_) == list(logreg_run.pipeline.classes_)


# --- saved heads cannot run code -------------------------------------------------------------------

class _WritesMarker:
    """Unpickling it writes a file: what a hostile head would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _sidecar(path):
    return path.with_name(path.name + ".json")


def test_joblib_head_is_refused_without_running_it(logreg_run, tmp_path):
    path = save_head(logreg_run.pipeline, logreg_run.result, tmp_path)
    marker = tmp_path / "ran"
    old = path.with_suffix(".joblib")
    old.write_bytes(pickle.dumps(_WritesMarker(marker)))
    _sidecar(old).write_text(json.dumps({"schema": "featprobe.head/1", "sklearn": "1.0"}))
    path.unlink()
    for asked in (old, path):  # named directly, or found where the new head would be
        with pytest.raises(UserError, match=r"is a joblib head.*could run code; refit it with "
                                            r"`python -m probe --head logreg`"):
            load_head(asked)
    assert not marker.exists()


def test_head_holding_an_unknown_type_is_refused_without_building_it(logreg_run, tmp_path):
    path = save_head(logreg_run.pipeline, logreg_run.result, tmp_path)
    marker = tmp_path / "ran"
    sio.dump(Pipeline([("scale", "passthrough"), ("head", _Hostile(marker))]), path)
    side = json.loads(_sidecar(path).read_text())
    _sidecar(path).write_text(json.dumps({**side, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}))
    with pytest.raises(UserError, match=r"holds types a featprobe head never holds \(.*_Hostile\)"):
        load_head(path)
    assert not marker.exists()


class _Hostile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __setstate__(self, state):
        Path(state["marker"]).touch()


def test_head_that_is_not_the_file_its_sidecar_describes_is_refused(logreg_run, tmp_path):
    path = save_head(logreg_run.pipeline, logreg_run.result, tmp_path)
    other = save_head(logreg_run.pipeline, {**logreg_run.result, "head": "other"}, tmp_path)
    path.write_bytes(other.read_bytes() + b"\0")
    with pytest.raises(UserError, match=r"logreg\.skops is not the file its sidecar describes .*--head logreg"):
        load_head(path)


def test_sidecar_without_a_hash_is_refused(logreg_run, tmp_path):
    path = save_head(logreg_run.pipeline, logreg_run.result, tmp_path)
    side = json.loads(_sidecar(path).read_text())
    del side["sha256"]
    _sidecar(path).write_text(json.dumps(side))
    with pytest.raises(UserError, match="sidecar with the head's sha256"):
        load_head(path)


def test_the_cli_refuses_a_joblib_head_in_one_line(logreg_run, tmp_path, capsys):
    from probe.cli import main
    old = tmp_path / "logreg.joblib"
    old.write_bytes(pickle.dumps(_WritesMarker(tmp_path / "ran")))
    image = tmp_path / "x.png"
    image.write_bytes(b"not read")
    assert main(["predict", "--head-file", str(old), str(image)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "python -m probe --head logreg" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize("name", ["linear", "svm", "svm-rbf", "rf", "knn", "torch-logreg"])
def test_every_head_round_trips_through_the_safe_format(logreg_run, tmp_path, name):
    from probe.heads.catalog import build_torch_logreg, get_head
    X, y = blobs(n_classes=3, dim=6)
    if name == "torch-logreg":
        pipe = Pipeline([("scale", "passthrough"), ("head", build_torch_logreg(device="cpu"))])
    else:
        head = get_head(name)
        pipe = head.pipeline(**head.grid("fast", {"n": len(X), "d": 6, "x_var": 1.0})[0])
    pipe.fit(X, y)
    path = save_head(pipe, {**logreg_run.result, "head": name}, tmp_path)
    loaded, sidecar = load_head(path)
    assert path.suffix == ".skops" and sidecar["format"] == "skops"
    assert type(loaded[-1]) is type(pipe[-1])
    assert np.array_equal(loaded.predict(X), pipe.predict(X))
