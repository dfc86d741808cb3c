"""Dataset registry: imagefolder layouts, digits, synthetic, torchvision sets, fingerprints, errors."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest
from PIL import Image

from extract.registry.datasets import Dataset, ImageSource, list_datasets, load_dataset
from extract.core.errors import UserError
from extract.registry.images import ImageError

TORCHVISION_SETS = ["cifar10", "cifar100", "stl10", "svhn", "mnist", "fashionmnist"]


def _img(path, colour=(200, 30, 30), size=(12, 10), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=fmt)
    return path


def _tree(root, layout: dict[str, list[str]]):
    """layout: relative dir -> file names; image files get real images, others text."""
    for d, names in layout.items():
        for n in names:
            p = root / d / n
            if os.path.splitext(n)[1].lower() in {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif",
                                                   ".tiff", ".webp", ".ppm", ".pgm"}:
                _img(p, fmt="PNG" if n.lower().endswith((".gif", ".webp", ".tif", ".tiff")) else None)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_text("not an image")
    return root


def test_registry_lists_required_names():
    names = list_datasets()
    assert names == sorted(names)
    for n in ["cifar10", "cifar100", "stl10", "imagefolder", "digits", "synthetic"]:
        assert n in names


# ---------------------------------------------------------------- imagefolder

def test_imagefolder_splits_and_class_union(tmp_path):
    _tree(tmp_path, {
        "train/cat": ["a.jpg", "b.JPG", "c.Png", "d.jpeg", ".hidden.jpg", "notes.txt", "._mac.jpg"],
        "train/cat/sub": ["e.bmp"],
        "train/dog": ["a.webp", "b.TIF", "c.ppm"],
        "train/.cache": ["x.jpg"],
        "Validation/cat": ["v.gif"],
        "Validation/eel": ["v1.pgm", "v2.tiff"],
        "test/dog": ["t.jpg"],
        "test/empty_class": ["readme.md"],
        "extra/ignored": ["z.jpg"],
    })
    ds = load_dataset("imagefolder", root=str(tmp_path))
    assert isinstance(ds, Dataset)
    assert list(ds.splits) == ["train", "val", "test"]
    assert ds.classes == ["cat", "dog", "eel"]
    tr, va, te = ds.splits["train"], ds.splits["val"], ds.splits["test"]
    names = [os.path.relpath(p, tmp_path) for p in tr.paths]
    assert names == ["train/cat/a.jpg", "train/cat/b.JPG", "train/cat/c.Png", "train/cat/d.jpeg",
                     "train/cat/sub/e.bmp", "train/dog/a.webp", "train/dog/b.TIF", "train/dog/c.ppm"]
    assert tr.labels.tolist() == [0] * 5 + [1] * 3 and tr.labels.dtype == np.int64
    assert va.labels.tolist() == [0, 2, 2] and te.labels.tolist() == [1]
    assert va.name == "val" and va.classes == ds.classes and va.arrays is None
    assert ds.identity == {"name": "imagefolder", "root": str(tmp_path), "options": {}}
    json.dumps(ds.identity)
    im = va.load(1)
    assert im.mode == "RGB" and im.size == (12, 10)


def test_imagefolder_without_split_folders_is_one_train_split(tmp_path):
    _tree(tmp_path, {"b": ["1.jpg", "2.jpg"], "a": ["1.png"]})
    ds = load_dataset("imagefolder", root=tmp_path)
    assert list(ds.splits) == ["train"] and ds.classes == ["a", "b"]
    assert ds.splits["train"].labels.tolist() == [0, 1, 1]


@pytest.mark.parametrize("layout, match", [
    ({}, "no images"),
    ({".": ["loose.jpg"]}, "no images"),
    ({"a": ["notes.txt"], "b": []}, "no images"),
    ({"train/a": ["1.jpg"], "test/a": ["x.txt"]}, "no class folders with images"),
    ({"val/a": ["1.jpg"], "validation/a": ["1.jpg"]}, "two folders"),
])
def test_imagefolder_bad_layouts(tmp_path, layout, match):
    _tree(tmp_path, layout)
    with pytest.raises(UserError, match=match):
        load_dataset("imagefolder", root=tmp_path)


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(UserError, match="--root"):
        load_dataset("imagefolder")
    with pytest.raises(UserError, match="not a folder"):
        load_dataset("imagefolder", root=tmp_path / "nowhere")


def _rows(ds, root):
    src = ds.splits["train"]
    return sorted((os.path.relpath(p, root), ds.classes[y]) for p, y in zip(src.paths, src.labels.tolist()))


def _left_out(ds, root):
    return {os.path.relpath(p, root): reason for p, reason in ds.left_out}


def test_class_folders_linking_to_each_other_give_each_image_once_under_its_class(tmp_path, caplog):
    _tree(tmp_path, {"a": ["1.jpg", "2.jpg"], "b": ["3.jpg"]})
    os.symlink("../b", tmp_path / "a" / "x")
    os.symlink("../a", tmp_path / "b" / "y")
    ds = load_dataset("imagefolder", root=tmp_path)
    assert _rows(ds, tmp_path) == [("a/1.jpg", "a"), ("a/2.jpg", "a"), ("b/3.jpg", "b")]
    assert _left_out(ds, tmp_path) == {"a/x": "a link to the folder of class b",
                                       "b/y": "a link to the folder of class a"}
    assert "left out 2 entries of" in caplog.text and "a/x: a link to the folder of class b" in caplog.text


def test_links_into_another_class_are_left_out_and_outside_folders_are_listed_once(tmp_path):
    _tree(tmp_path / "data", {"a": ["1.jpg"], "b/sub": ["2.jpg"]})
    _tree(tmp_path / "elsewhere", {".": ["3.jpg"]})
    root = tmp_path / "data"
    os.symlink(root / "b" / "sub", root / "a" / "into_b")
    os.symlink(root / "b" / "sub" / "2.jpg", root / "a" / "b_image.jpg")
    os.symlink(tmp_path / "elsewhere", root / "a" / "more")
    os.symlink(tmp_path / "elsewhere", root / "b" / "more_again")
    ds = load_dataset("imagefolder", root=root)
    assert _rows(ds, root) == [("a/1.jpg", "a"), ("a/more/3.jpg", "a"), ("b/sub/2.jpg", "b")]
    assert _left_out(ds, root) == {"a/into_b": "a link into the folder of class b",
                                   "a/b_image.jpg": "a link to an image of class b",
                                   "b/more_again": f"a link to {tmp_path / 'elsewhere'}, listed already"}


def test_loops_special_files_and_folders_named_like_images_are_left_out_with_a_reason(tmp_path):
    _tree(tmp_path, {"a": ["1.jpg"], "a/photo.jpg": ["inside.jpg"], "b": ["2.jpg"]})
    a = tmp_path / "a"
    os.symlink(a, a / "self")                                  # a folder linking to itself
    os.symlink(a / "ping.jpg", a / "pong.jpg")                 # two links linking to each other
    os.symlink(a / "pong.jpg", a / "ping.jpg")
    os.symlink("/dev/zero", a / "zero.jpg")
    os.mkfifo(a / "pipe.jpg")
    os.symlink(a / "gone", a / "dangling.jpg")
    ds = load_dataset("imagefolder", root=tmp_path)
    assert _rows(ds, tmp_path) == [("a/1.jpg", "a"), ("b/2.jpg", "b")]
    assert _left_out(ds, tmp_path) == {
        "a/photo.jpg": "a folder named like an image file", "a/self": f"a link back to {a}, which contains it",
        "a/ping.jpg": "a link loop", "a/pong.jpg": "a link loop", "a/zero.jpg": "a character device, not an image file",
        "a/pipe.jpg": "a FIFO, not an image file", "a/dangling.jpg": "a link to nothing"}


def test_corrupt_file_is_listed_and_load_raises(tmp_path):
    _tree(tmp_path, {"a": ["ok.jpg"]})
    (tmp_path / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    src = load_dataset("imagefolder", root=tmp_path).splits["train"]
    assert len(src) == 2
    with pytest.raises(ImageError) as err:
        src.load(src.paths.index(str(tmp_path / "a" / "bad.jpg")))
    assert err.value.path.endswith("bad.jpg")
    assert src.load(src.paths.index(str(tmp_path / "a" / "ok.jpg"))).mode == "RGB"


def test_hymenoptera(hymenoptera):
    ds = load_dataset("imagefolder", root=str(hymenoptera))
    assert ds.classes == ["ants", "bees"]
    tr, va = ds.splits["train"], ds.splits["val"]
    assert list(ds.splits) == ["train", "val"]
    assert len(tr) == 245 and len(va) == 153
    assert np.bincount(tr.labels).tolist() == [124, 121]
    assert np.bincount(va.labels).tolist() == [70, 83]
    gif = [i for i, p in enumerate(tr.paths) if p.endswith(".gif")]
    assert len(gif) == 1 and os.path.basename(tr.paths[gif[0]]) == "imageNotFound.gif"
    # the placeholder is a valid 300x300 GIF (a grey "image not found" card), so it loads
    im = tr.load(gif[0])
    assert im.mode == "RGB" and im.size == (300, 300)
    assert np.asarray(im).mean() > 200
    for src in (tr, va):  # every file in the folder decodes
        for i in range(len(src)):
            assert src.load(i).mode == "RGB"


def test_cifar10_jpeg_layout(cifar10_jpg):
    ds = load_dataset("imagefolder", root=cifar10_jpg)
    assert list(ds.splits) == ["train", "test"]
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                          "ship", "truck"]
    tr, te = ds.splits["train"], ds.splits["test"]
    assert len(tr) == 50000 and len(te) == 10000
    assert np.bincount(tr.labels).tolist() == [5000] * 10
    assert np.bincount(te.labels).tolist() == [1000] * 10
    im = te.load(len(te) - 1)
    assert im.size == (32, 32) and te.paths[-1].split(os.sep)[-2] == "truck"


# ---------------------------------------------------------------- fingerprints

def test_file_fingerprint_tracks_content_identity(tmp_path):
    _tree(tmp_path, {"train/a": ["1.jpg", "2.jpg"], "train/b": ["1.jpg"]})

    def fp():
        return load_dataset("imagefolder", root=tmp_path).splits["train"].fingerprint()

    base = fp()
    assert fp() == base
    (tmp_path / "train/a/notes.txt").write_text("x")
    (tmp_path / "train/a/.DS_Store").write_bytes(b"x")
    assert fp() == base

    st = os.stat(tmp_path / "train/a/2.jpg")
    os.utime(tmp_path / "train/a/2.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    touched = fp()
    assert touched != base

    _img(tmp_path / "train/b/2.jpg")
    added = fp()
    assert added not in (base, touched)

    os.rename(tmp_path / "train/b/2.jpg", tmp_path / "train/a/3.jpg")  # relabelled, same bytes
    assert fp() not in (base, touched, added)


def test_file_fingerprint_survives_moving_the_root(tmp_path):
    _tree(tmp_path / "one", {"a": ["1.jpg"], "b": ["1.jpg"]})
    before = load_dataset("imagefolder", root=tmp_path / "one").splits["train"].fingerprint()
    os.rename(tmp_path / "one", tmp_path / "two")
    assert load_dataset("imagefolder", root=tmp_path / "two").splits["train"].fingerprint() == before


def test_array_fingerprint_and_subset():
    src = load_dataset("synthetic", n=12, size=8).splits["train"]
    fp = src.fingerprint()
    assert fp == load_dataset("synthetic", n=12, size=8).splits["train"].fingerprint()
    changed = src.arrays.copy()
    changed[3, 0, 0, 0] ^= 1
    assert ImageSource("train", src.classes, src.labels, arrays=changed).fingerprint() != fp
    relabelled = src.labels.copy()
    relabelled[0] = (relabelled[0] + 1) % len(src.classes)
    assert ImageSource("train", src.classes, relabelled, arrays=src.arrays).fingerprint() != fp
    sub = src.subset([5, 1])
    assert len(sub) == 2 and sub.labels.tolist() == src.labels[[5, 1]].tolist()
    np.testing.assert_array_equal(np.asarray(sub.load(0)), src.arrays[5])


# ---------------------------------------------------------------- digits, synthetic

def test_digits_split_is_stratified_and_deterministic():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    tr, te = ds.splits["train"], ds.splits["test"]
    assert list(ds.splits) == ["train", "test"]
    assert ds.classes == [str(i) for i in range(10)]
    assert len(tr) == 1347 and len(te) == 450
    assert tr.arrays.shape == (1347, 8, 8, 3) and tr.arrays.dtype == np.uint8 and tr.paths is None
    assert tr.arrays.max() == 255 and tr.arrays.min() == 0
    assert np.array_equal(tr.arrays[..., 0], tr.arrays[..., 2])
    y = load_digits().target
    total = np.bincount(y)
    frac = np.bincount(te.labels, minlength=10) / total
    assert np.all(np.abs(frac - 0.25) < 0.01)
    # every original image appears exactly once across the two splits
    raw = np.rint(load_digits().images * 255 / 16).astype(np.uint8)
    both = np.concatenate([tr.arrays[..., 0], te.arrays[..., 0]])
    assert sorted(map(bytes, both)) == sorted(map(bytes, raw))
    again = load_dataset("digits").splits["test"]
    assert np.array_equal(again.arrays, te.arrays) and again.fingerprint() == te.fingerprint()
    im = te.load(0)
    assert im.mode == "RGB" and im.size == (8, 8)
    assert ds.identity == {"name": "digits", "root": None, "options": {}}


def test_synthetic_is_deterministic_and_learnable():
    from sklearn.linear_model import LogisticRegression

    ds = load_dataset("synthetic", n=80, size=16, classes=4, seed=3)
    tr, te = ds.splits["train"], ds.splits["test"]
    assert ds.classes == ["class0", "class1", "class2", "class3"]
    assert tr.arrays.shape == (80, 16, 16, 3) and np.bincount(tr.labels).tolist() == [20] * 4
    assert ds.identity["options"] == {"n": 80, "size": 16, "classes": 4, "seed": 3}
    assert np.array_equal(load_dataset("synthetic", n=80, size=16, classes=4, seed=3)
                          .splits["train"].arrays, tr.arrays)
    assert not np.array_equal(load_dataset("synthetic", n=80, size=16, classes=4, seed=4)
                              .splits["train"].arrays, tr.arrays)
    assert not np.array_equal(tr.arrays, te.arrays)
    clf = LogisticRegression(max_iter=500).fit(tr.arrays.reshape(80, -1) / 255.0, tr.labels)
    assert clf.score(te.arrays.reshape(80, -1) / 255.0, te.labels) > 0.9


def test_synthetic_rejects_bad_options():
    with pytest.raises(UserError, match="classes"):
        load_dataset("synthetic", classes=1)
    with pytest.raises(UserError, match="no option"):
        load_dataset("synthetic", colour="red")
    with pytest.raises(UserError, match="no option"):
        load_dataset("digits", n=5)


# ---------------------------------------------------------------- names and torchvision sets

@pytest.mark.parametrize("typo, suggestion", [("cifar", "cifar10"), ("digit", "digits"),
                                              ("imagefoldr", "imagefolder"), ("stl-1O", "stl10")])
def test_unknown_name_suggests_close_matches(typo, suggestion):
    with pytest.raises(UserError, match="did you mean") as err:
        load_dataset(typo)
    assert suggestion in str(err.value) and repr(typo) in str(err.value)


def test_name_spelling_is_forgiving():
    assert load_dataset("Synthetic", n=4).name == "synthetic"


@pytest.mark.parametrize("name", TORCHVISION_SETS)
def test_missing_torchvision_files_say_where_and_download(tmp_path, name):
    with pytest.raises(UserError) as err:
        load_dataset(name, root=str(tmp_path))
    msg = str(err.value)
    if name == "cifar10":
        assert "imagefolder" in msg  # points JPEG-folder users to the right dataset
    assert "--download" in msg and str(tmp_path) in msg and "\n" not in msg


def test_default_root_is_data_under_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=str(tmp_path / "data")):
        load_dataset("cifar10")


def _write_idx(path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    magic = 0x0800 + array.ndim  # unsigned byte data
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_style_files_become_rgb_arrays(tmp_path, name, folder):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 7), ("t10k", 3)):
        _write_idx(tmp_path / folder / "raw" / f"{prefix}-images-idx3-ubyte",
                   rng.integers(0, 256, (n, 28, 28)))
        _write_idx(tmp_path / folder / "raw" / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    ds = load_dataset(name, root=tmp_path)
    tr, te = ds.splits["train"], ds.splits["test"]
    assert len(ds.classes) == 10 and (name != "mnist" or ds.classes[3] == "3")
    assert tr.arrays.shape == (7, 28, 28, 3) and te.arrays.shape == (3, 28, 28, 3)
    assert tr.labels.tolist() == list(range(7))
    assert np.array_equal(tr.arrays[..., 0], tr.arrays[..., 1])
    assert ds.identity == {"name": name, "root": str(tmp_path), "options": {}}
    im = tr.load(2)
    assert im.mode == "RGB" and im.size == (28, 28)


def test_image_source_validates_inputs():
    with pytest.raises(ValueError):
        ImageSource("train", ["a"], [0], paths=["x.jpg"], arrays=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError):
        ImageSource("train", ["a"], [0], arrays=np.zeros((1, 2, 2), np.uint8))
    with pytest.raises(ValueError):
        ImageSource("train", ["a"], [0, 0], paths=["x.jpg"])
