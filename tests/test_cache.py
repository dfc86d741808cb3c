"""The HDF5 cache on its own: round trip, chunks of unfinished runs, damaged files, the reader's refusals."""

import os

import h5py
import numpy as np
import pytest

from extract.store.assemble import assemble
from extract.store.cache import iter_rows, load_features, partial_path, read_header, write_features
from extract.store.chunks import ChunkStore, Rows
from extract.store.incremental import Reuse
from extract.store.catalog import feature_sets, find_caches
from extract.core.errors import UserError
from probe_helpers import toy_identity

IDENT = toy_identity(dataset="d", model="m", taps=("penultimate", "layer4"))
PROV = {"model": "m", "weights": "w", "dataset": "d", "split": "train", "classes": ["a", "b", "c"],
        "layers": ["penultimate", "layer4"], "dims": {"penultimate": 16, "layer4": 8}}


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


def store_for(path, chunk_rows=10, n=50, **manifest):
    return ChunkStore.open(path, {"chunk_rows": chunk_rows, "n_images": n, "fingerprint": "f0", **manifest})


def chunk(k, chunk_rows=10, skip=()):
    feats, labels, index = rows(chunk_rows, k * chunk_rows)
    keep = ~np.isin(index, skip)
    return Rows({n: v[keep] for n, v in feats.items()}, labels[keep], index[keep], None, None,
                [(int(i), 1, f"/data/{i}.jpg", "truncated image data", 5, 6) for i in skip])


def assembled(path, store):
    return assemble(store, Reuse.none(store.n), IDENT, Source(store.n), None, "f0", PROV, PROV["dims"])


class Source:
    """An in-memory source as assemble sees it: a name, labels, no paths."""

    def __init__(self, n):
        self.name, self.paths, self.labels = "train", None, np.arange(n) % 3


def test_chunks_written_in_any_order_assemble_to_the_in_order_rows(tmp_path):
    path = tmp_path / "train.h5"
    store = store_for(path)
    for k in (3, 0, 4, 2):
        store.write(k, chunk(k))
    assert store.done() == {0, 2, 3, 4} and not path.exists()
    with pytest.raises(UserError, match="incomplete.*40 rows in 4 of 5 chunks"):
        load_features(path)
    assert feature_sets(tmp_path) == [] and find_caches(tmp_path) == []  # .partial folders are not caches
    store = store_for(path)           # a rerun with the same manifest keeps the finished chunks
    assert store.done() == {0, 2, 3, 4}
    store.write(1, chunk(1))
    assembled(path, store)
    X, y, meta = load_features(path)
    np.testing.assert_array_equal(X, np.concatenate([rows(10, s)[0]["penultimate"] for s in range(0, 50, 10)]))
    np.testing.assert_array_equal(meta["index"], np.arange(50))
    assert not partial_path(path).exists()


def test_chunks_of_other_inputs_are_discarded_not_mixed(tmp_path):
    path = tmp_path / "train.h5"
    store_for(path).write(0, chunk(0))
    assert store_for(path, fingerprint="changed").done() == set()
    store_for(path).write(0, chunk(0))
    assert store_for(path, chunk_rows=20).done() == set()


def test_a_chunk_is_whole_or_absent(tmp_path):
    path = tmp_path / "train.h5"
    store = store_for(path)
    broken = chunk(0)
    broken.features = {"penultimate": broken.features["penultimate"],
                       "layer4": np.array([object()] * 10, dtype=object)}   # h5py refuses it mid-write
    with pytest.raises(TypeError):
        store.write(0, broken)
    assert store.done() == set() and [p.name for p in store.dir.iterdir()] == ["manifest.json"]


def test_skipped_images_are_recorded(tmp_path):
    path = tmp_path / "train.h5"
    store = store_for(path, chunk_rows=5, n=5)
    store.write(0, chunk(0, 5, skip=(4,)))
    assembled(path, store)
    assert load_features(path).meta["skipped"] == [{"index": 4, "label": 1, "path": "/data/4.jpg",
                                                     "reason": "truncated image data"}]
    assert len(load_features(path).y) == 4


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


def test_in_memory_rows_have_no_paths_column(tmp_path):
    path = tmp_path / "train.h5"
    store = store_for(path, n=15)
    store.write(0, chunk(0))
    store.write(1, chunk(1, 5))
    assembled(path, store)
    with h5py.File(path) as f:
        assert "paths" not in f and "stamps" not in f
    assert load_features(path).meta["paths"] is None and len(load_features(path).y) == 15


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
    code = "import sys, extract, probe.protocol.data; from extract import load_features; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _damage(path, where: float, n=300, seed=0):
    """Random bytes over part of the file, its size unchanged."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(int(where * (size - n)))
        f.write(np.random.default_rng(seed).bytes(n))
    assert os.path.getsize(path) == size


@pytest.mark.parametrize("where", [0.01, 0.02, 0.5, 0.9])
def test_random_bytes_inside_a_cache_are_named_skipped_and_refused(tmp_path, caplog, where):
    damaged = write_features(IDENT, tmp_path, "train", *rows(3000), PROV)
    other = write_features(toy_identity(dataset="e", model="m"), tmp_path, "train", *rows(30),
                           {**PROV, "dataset": "e"})
    assert read_header(damaged)["damaged"] is None
    _damage(damaged, where)
    header = read_header(damaged)
    assert header["damaged"] and not header["complete"]
    with caplog.at_level("WARNING", logger="extract"):
        groups = feature_sets(tmp_path)
    assert [g.files["train"] for g in groups] == [other]
    assert f"skipped {damaged}: it is damaged" in caplog.text
    with pytest.raises(UserError, match=f"cache {damaged} is damaged"):
        load_features(damaged)


def test_a_cache_with_random_bytes_inside_is_extracted_again(tmp_path):
    from extract.api import extract
    args = dict(model="cifar_resnet20", weights="none", data="synthetic", dataset_options={"n": 300},
                splits=["train"], cache_dir=tmp_path, progress=False)
    first = extract(**args)["train"].path
    X = load_features(first).X
    _damage(first, 0.5)
    again = extract(**args)["train"]
    assert again.status == "extracted" and again.path == first
    assert np.array_equal(load_features(first).X, X)
