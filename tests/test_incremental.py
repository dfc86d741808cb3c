"""A changed image folder: unchanged files reuse their rows, the rest is computed, the result is a fresh run's."""

import os

import h5py
import numpy as np
import pytest
from PIL import Image

from extract import load_features
from extract.api import extract
from extract.core.errors import UserError
from extract.store.cache import digest_path
from test_extract import make_folder

TINY = {"model": "cifar_resnet20", "weights": "none", "progress": False, "precision": "fp32", "splits": ["train"]}


def run(root, cache, **kw):
    return extract(data="imagefolder", root=str(root), cache_dir=cache, **{**TINY, **kw})["train"]


def same_rows(a, b):
    assert a.meta["paths"] == b.meta["paths"]
    np.testing.assert_array_equal(a.y, b.y)
    np.testing.assert_array_equal(a.meta["index"], b.meta["index"])
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_grown_shrunk_and_edited_folder_reuses_unchanged_rows_and_equals_a_fresh_run(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=20, splits=("train",))
    cache = tmp_path / "cache"
    first = run(root, cache, chunk_rows=8)
    before = load_features(first.path)

    Image.new("RGB", (40, 40), "red").save(root / "train" / "cat" / "new1.png")
    Image.new("RGB", (40, 40), "blue").save(root / "train" / "dog" / "new2.png")
    (root / "train" / "dog" / "003.png").unlink()
    edited = root / "train" / "cat" / "005.png"
    Image.new("RGB", (40, 40), "green").save(edited)
    os.utime(edited, ns=(1, 1_000_000_000))   # a different stamp even on a coarse clock

    res = run(root, cache, chunk_rows=8)
    assert res.status == "updated" and res.path == first.path
    assert res.reuse == "38 reused, 2 new, 1 removed, 1 changed"
    assert res.images == 3, "only the new and changed images are computed"
    after = load_features(res.path)
    assert len(after.y) == 41 and not any(p.endswith("dog/003.png") for p in after.meta["paths"])
    fresh = load_features(run(root, tmp_path / "fresh", chunk_rows=8).path)
    same_rows(after, fresh)
    old = dict(zip(before.meta["paths"], before.X))
    for path, x in zip(after.meta["paths"], after.X):
        if path in old and not path.endswith("cat/005.png"):
            np.testing.assert_array_equal(x, old[path])   # copied, not recomputed
    assert run(root, cache, chunk_rows=8).status == "hit"


def test_a_new_class_folder_relabels_reused_rows_without_recomputing_them(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=4, splits=("train",), classes=("cat", "dog"))
    cache = tmp_path / "cache"
    run(root, cache)
    os.makedirs(root / "train" / "ant")
    Image.new("RGB", (40, 40), "red").save(root / "train" / "ant" / "a.png")
    res = run(root, cache)
    assert res.reuse == "8 reused, 1 new, 0 removed, 0 changed" and res.images == 1
    after = load_features(res.path)
    assert after.meta["provenance"]["classes"] == ["ant", "cat", "dog"]
    np.testing.assert_array_equal(after.y, [0, 1, 1, 1, 1, 2, 2, 2, 2])


def test_unreadable_images_are_remembered_and_a_removed_one_is_forgotten(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=4, splits=("train",))
    (root / "train" / "dog" / "bad1.jpg").write_bytes(b"not a jpeg")
    (root / "train" / "dog" / "bad2.jpg").write_bytes(b"not a jpeg either")
    cache = tmp_path / "cache"
    assert run(root, cache).skipped == 2
    (root / "train" / "dog" / "bad2.jpg").unlink()
    Image.new("RGB", (40, 40), "red").save(root / "train" / "cat" / "new.png")
    res = run(root, cache)
    assert res.reuse == "9 reused, 1 new, 1 removed, 0 changed"
    assert res.images == 1 and res.skipped == 0, "a known unreadable file is not read again"
    skipped = load_features(res.path).meta["skipped"]
    assert [os.path.basename(s["path"]) for s in skipped] == ["bad1.jpg"]


@pytest.mark.slow
def test_an_interrupted_update_resumes_with_the_same_plan(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=12, splits=("train",))
    cache = tmp_path / "cache"
    run(root, cache, chunk_rows=4)
    for i in range(6):
        Image.new("RGB", (40, 40), (i * 40, 0, 0)).save(root / "train" / "cat" / f"new{i}.png")
    (root / "train" / "cat" / "new5.png").write_bytes(b"broken")   # stops the run after earlier chunks
    with pytest.raises(UserError, match="new5.png"):
        run(root, cache, chunk_rows=4, on_error="stop")
    (root / "train" / "cat" / "new5.png").unlink()
    Image.new("RGB", (40, 40), "red").save(root / "train" / "cat" / "new5.png")
    res = run(root, cache, chunk_rows=4)
    assert res.status == "updated" and res.reuse == "24 reused, 6 new, 0 removed, 0 changed"
    same_rows(load_features(res.path), load_features(run(root, tmp_path / "fresh", chunk_rows=4).path))


def test_caches_without_file_stamps_and_changed_networks_still_need_overwrite(tmp_path):
    root = make_folder(tmp_path / "pets", per_class=3, splits=("train",))
    cache = tmp_path / "cache"
    path = run(root, cache).path
    with h5py.File(path, "a") as f:   # as written before per-file stamps were recorded
        del f["stamps"]
    digest_path(path).unlink()          # nor their sha256
    Image.new("RGB", (40, 40), "red").save(root / "train" / "cat" / "new.png")
    with pytest.raises(UserError, match="images changed.*--overwrite"):
        run(root, cache)
    assert run(root, cache, overwrite=True).status == "extracted"

    run(root, cache, normalize="dataset")   # the train split's mean/std: new images change every input
    Image.new("RGB", (40, 40), "blue").save(root / "train" / "dog" / "new.png")
    with pytest.raises(UserError, match="preprocessing changed.*--overwrite"):
        run(root, cache, normalize="dataset")
