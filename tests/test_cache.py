"""The HDF5 cache on its own: round trip, resume, partial and damaged files, the reader's refusals."""

import os

import h5py
import numpy as np
import pytest

from extract.cache import CacheWriter, iter_rows, load_features, partial_path, read_header, write_features
from extract.catalog import feature_sets, find_caches
from extract.errors import UserError
from probe_helpers import toy_identity

IDENT = toy_identity(dataset="d", model="m", taps=("penultimate", "layer4"))
PROV = {"model": "m", "weights": "w", "dataset": "d", "split": "train", "classes": ["a", "b", "c"],
        "layers": ["penultimate", "layer4"], "dims": {"penultimate": 16, "layer4": 8}}


def writer(path, identity=IDENT, fingerprint="f0", has_paths=False, **kw):
    return CacheWriter(path, identity, "train", fingerprint, PROV, PROV["dims"], has_paths=has_paths, **kw)


def rows(n, start=0, seed=0):
    rng = np.random.default_rng(seed + start)
    return ({"penultimate": rng.normal(size=(n, 16)).astype(np.float32),
             "layer4": rng.normal(size=(n, 8)).astype(np.float32)},
            np.arange(start, start + n) % 3, np.arange(start, start + n))


def test_round_trip_keeps_layers_labels_index_identity_and_provenance(tmp_path):
    feats, labels, index = rows(50)
    path = write_features(IDENT, tmp_path, "train", feats, labels, index, PROV, paths=[f"img{i}.jpg" for i in range(50)])
    assert path == tmp_path / "d" / "m" / "train.h5"
    X, y, meta = load_features(path)
    assert meta["identity"] == IDENT and meta["split"] == "train"
    np.testing.assert_array_equal(X, feats["penultimate"])
    np.testing.assert_array_equal(y, labels)
    np.testing.assert_array_equal(meta["index"], index)
    assert meta["classes"] == ["a", "b", "c"]
    assert meta["paths"][7] == "img7.jpg"
    assert meta["layer"] == "penultimate" and set(meta["layers"]) == {"penultimate", "layer4"}
    assert meta["versions"]["h5py"] == h5py.__version__
    X4, _, _ = load_features(path, layer="layer4")
    np.testing.assert_array_equal(X4, feats["layer4"])
    with h5py.File(path) as f:
        ds = f["features/penultimate"]
        assert ds.maxshape == (None, 16) and ds.chunks is not None
        assert f.attrs["complete"] and f.attrs["model"] == "m" and f.attrs["precision"] == "fp32"


def test_float16_storage(tmp_path):
    feats, labels, index = rows(10)
    path = write_features(toy_identity(dataset="d", model="m", dtype="float16"), tmp_path, "train", feats, labels,
                          index, PROV)
    assert path.name == "train.float16.h5"
    X, _, meta = load_features(path)
    assert X.dtype == np.float16 and meta["dtype"] == "float16"
    np.testing.assert_allclose(X, feats["penultimate"], rtol=1e-2, atol=1e-3)


def test_unknown_layer_and_missing_file_are_user_errors(tmp_path):
    path = write_features(IDENT, tmp_path, "train", *rows(5), PROV)
    with pytest.raises(UserError, match="no layer 'layer9'.*layer4, penultimate"):
        load_features(path, layer="layer9")
    with pytest.raises(UserError, match="no cache file"):
        load_features(tmp_path / "nope.h5")


def test_reader_refuses_partial_files_and_writer_resumes_them(tmp_path):
    path = tmp_path / "train.h5"
    w = writer(path, flush_rows=10)
    for start in range(0, 30, 10):
        w.append(*rows(10, start), next_index=start + 10)
    w.close()  # as after Ctrl-C
    assert not path.exists() and partial_path(path).exists()
    with pytest.raises(UserError, match="incomplete.*30 rows"):
        load_features(path)
    with pytest.raises(UserError, match="incomplete"):
        load_features(partial_path(path))
    assert feature_sets(tmp_path) == [] and find_caches(tmp_path) == []  # .partial files are not caches

    w = writer(path)
    assert w.resumed_from == 30
    w.append(*rows(20, 30), next_index=50)
    w.finish()
    X, y, meta = load_features(path)
    expected = np.concatenate([rows(10, s)[0]["penultimate"] for s in (0, 10, 20)] + [rows(20, 30)[0]["penultimate"]])
    np.testing.assert_array_equal(X, expected)
    np.testing.assert_array_equal(meta["index"], np.arange(50))
    assert not partial_path(path).exists()


def test_partial_from_other_inputs_is_discarded_not_mixed(tmp_path):
    path = tmp_path / "train.h5"
    w = writer(path, flush_rows=1)
    w.append(*rows(10), next_index=10)
    w.close()
    w = writer(path, fingerprint="changed")
    assert w.resumed_from == 0 and w.n_rows == 0
    w.close()
    w = writer(path, identity=toy_identity(dataset="d", model="m", precision="bf16", taps=IDENT.taps))
    assert w.resumed_from == 0
    w.close()


def test_rows_beyond_the_recorded_progress_are_dropped_on_resume(tmp_path):
    path = tmp_path / "train.h5"
    w = writer(path, flush_rows=1)
    w.append(*rows(10), next_index=10)
    w.close()
    with h5py.File(partial_path(path), "a") as f:  # data written, crash before progress was recorded
        for ds in list(f["features"].values()) + [f["labels"], f["index"]]:
            ds.resize(ds.shape[0] + 5, axis=0)
    w = writer(path)
    assert w.resumed_from == 10 and w.n_rows == 10
    w.finish()
    assert load_features(path).X.shape == (10, 16)


def test_skipped_images_are_recorded(tmp_path):
    path = tmp_path / "train.h5"
    w = writer(path)
    w.append(*rows(4), next_index=5)
    w.skip(4, "/data/bad.jpg", "truncated image data", label=1)
    w.finish()
    assert load_features(path).meta["skipped"] == [{"index": 4, "label": 1, "path": "/data/bad.jpg",
                                                     "reason": "truncated image data"}]


def test_streaming_reader_yields_every_row_in_blocks(tmp_path):
    feats, labels, index = rows(25)
    path = write_features(IDENT, tmp_path, "train", feats, labels, index, PROV)
    blocks = list(iter_rows(path, rows=10))
    assert [len(b[1]) for b in blocks] == [10, 10, 5]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in blocks]), feats["penultimate"])


def test_feature_sets_group_splits_by_identity_newest_first(tmp_path):
    a = write_features(toy_identity(dataset="d", model="m1"), tmp_path, "train", *rows(3), PROV)
    write_features(toy_identity(dataset="d", model="m1"), tmp_path, "test", *rows(3), PROV)
    b = write_features(toy_identity(dataset="d", model="m2"), tmp_path, "train", *rows(3), PROV)
    os.utime(a, (1e9, 1e9))
    os.utime(a.with_name("test.h5"), (1e9, 1e9))
    groups = feature_sets(tmp_path)
    assert [g.identity.model for g in groups] == ["m2", "m1"]
    assert set(groups[1].files) == {"train", "test"} and groups[0].files == {"train": b}
    assert read_header(b)["complete"]


def test_in_memory_rows_have_no_paths_column_even_after_resume(tmp_path):
    path = tmp_path / "train.h5"
    w = writer(path, flush_rows=1)
    w.append(*rows(10), next_index=10)
    w.close()
    w = writer(path)
    assert w.resumed_from == 10
    w.append(*rows(5, 10), next_index=15)
    w.finish()
    with h5py.File(path) as f:
        assert "paths" not in f
    assert load_features(path).meta["paths"] is None


def test_truncated_cache_is_called_damaged_with_how_to_rebuild(tmp_path):
    path = write_features(IDENT, tmp_path, "train", *rows(2000), PROV)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(UserError, match="damaged.*rerun the same `python -m extract` command"):
        load_features(path)
    assert read_header(path)["damaged"]


def test_reading_caches_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, extract, probe.data; from extract import load_features; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
