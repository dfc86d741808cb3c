"""Input resolution (--image-size) and normalisation by the dataset's own statistics (--normalize dataset).

Both are part of the feature identity: named in paths, checked by the hit rule, recorded in the file.
Values are compared at precision fp32, so nothing depends on whether the CPU has native bf16.
"""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from extract import load_features
from extract.run import normalize as norm
from extract.api import extract, plan
from extract.run.extraction import check_runs_at as _check_runs_at
from extract.store.catalog import CacheQuery, feature_sets, select
from extract.cli import main
from extract.compute.engine import effective_preprocess
from extract.core.errors import UserError
from extract.store.identity import DataRef, FeatureIdentity
from extract.store.preprocess import Preprocess

TINY = {"model": "cifar_resnet20", "weights": "none", "progress": False, "precision": "fp32"}
SYN = {"data": "synthetic", "dataset_options": {"n": 24}}


def make_folder(root, sizes=((40, 30), (24, 36), (50, 50)), classes=("cat", "dog"), seed=0):
    """train/ and test/ class folders of PNGs of different sizes (so resize and crop both matter)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for c, name in enumerate(classes):
            os.makedirs(root / split / name, exist_ok=True)
            for i, (w, h) in enumerate(sizes):
                pixels = rng.integers(0, 120, (h, w, 3), dtype=np.uint8)
                pixels[..., c] += 100
                Image.fromarray(pixels).save(root / split / name / f"{i:03d}.png")
    return root


def numpy_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std in [0, 1] of (N, 3, H, W) uint8 images."""
    x = images.astype(np.float64) / 255
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


# ---------------------------------------------------------------- --image-size

def test_image_size_keeps_the_weights_crop_ratio_for_files_and_resizes_arrays_straight():
    pre = Preprocess(256, 224, "bicubic")
    assert effective_preprocess(pre, False, 32) == Preprocess(37, 32, "bicubic")     # round(32 * 256 / 224)
    assert effective_preprocess(pre, False, 448) == Preprocess(512, 448, "bicubic")
    assert effective_preprocess(pre, True, 32) == Preprocess(32, 32, "bicubic")
    assert effective_preprocess(pre, False) == pre
    assert effective_preprocess(pre, True) == Preprocess(224, 224, "bicubic")


def test_image_size_is_its_own_cache_with_other_values_and_the_default_stays_put(tmp_path):
    default = extract(cache_dir=tmp_path, **SYN, **TINY)
    sized = extract(cache_dir=tmp_path, image_size=16, **SYN, **TINY)
    assert default["train"].path.name == "train.fp32.h5"
    assert sized["train"].path.name == "train.size16.fp32.h5"
    assert sized["train"].path.parent == default["train"].path.parent
    X0, y0, meta0 = load_features(default["train"].path)
    X1, y1, meta1 = load_features(sized["train"].path)
    assert (y0 == y1).all() and X0.shape == X1.shape and not np.allclose(X0, X1, atol=1e-4)
    ident = meta1["identity"]
    assert ident.image_size == 16 and (ident.preprocess.resize, ident.preprocess.crop) == (16, 16)
    assert meta1["provenance"]["image_size"] == 16 and meta0["identity"].image_size is None
    # both are hits afterwards; neither replaced the other
    again = extract(cache_dir=tmp_path, image_size=16, **SYN, **TINY)
    assert {r.status for r in again.values()} == {"hit"}
    assert {r.status for r in extract(cache_dir=tmp_path, **SYN, **TINY).values()} == {"hit"}


def test_the_weights_own_size_asked_for_explicitly_is_the_default_request(tmp_path):
    assert plan(cache_dir=tmp_path, image_size=32, **SYN, **TINY).identity == plan(cache_dir=tmp_path, **SYN,
                                                                                      **TINY).identity


@pytest.mark.parametrize("size, message", [("7", "out of range"), ("1025", "out of range"), ("0", "out of range"),
                                           ("-3", "out of range"), ("abc", "whole number"), ("3.5", "whole number")])
def test_cli_bad_image_size_is_one_line_and_exit_2(tmp_path, capsys, size, message):
    argv = ["--model", "cifar_resnet20.none", "--data", "synthetic", "--cache-dir", str(tmp_path), "--no-progress"]
    assert main([*argv, f"--image-size={size}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir()), "nothing is written for a rejected size"


@pytest.mark.parametrize("size", [8, 1024])
def test_size_bounds_are_inclusive(tmp_path, size):
    assert plan(cache_dir=tmp_path, image_size=size, **SYN, **TINY).identity.preprocess.crop == size


def test_a_network_that_cannot_take_the_size_is_a_one_line_error():
    backbone = nn.Sequential(*[nn.MaxPool2d(2) for _ in range(4)])   # 8 -> 4 -> 2 -> 1 -> error
    ident = FeatureIdentity(DataRef("x"), "m", None, Preprocess(8, 8), "fp32", image_size=8)
    with pytest.raises(UserError, match="cannot run on 8x8 inputs.*larger --image-size"):
        _check_runs_at(backbone, ident)


# ---------------------------------------------------------------- --normalize dataset

def test_dataset_statistics_of_files_match_numpy_over_the_resized_uint8_images(tmp_path):
    root = make_folder(tmp_path / "pets")
    p = plan("resnet18", "imagefolder", weights="none", root=str(root), precision="fp32", image_size=16,
             normalize="dataset", cache_dir=tmp_path / "cache", progress=False, workers=0)
    pre = p.identity.preprocess
    assert (pre.resize, pre.crop) == (18, 16)            # round(16 * 256 / 224), resnet18's own ratio
    train = p.dataset.splits["train"]
    images = np.stack([pre.resize_crop_pil(train.load(i)).numpy() for i in range(len(train))])
    mean, std = numpy_stats(images)
    np.testing.assert_allclose(pre.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pre.std, std, rtol=0, atol=1e-12)
    assert p.dataset_stats["n_images"] == len(train) and p.dataset_stats["split"] == "train"


def test_dataset_statistics_of_arrays_are_taken_after_the_resize_the_network_sees(tmp_path):
    p = plan(data="digits", normalize="dataset", cache_dir=tmp_path, **TINY)   # 8x8 digits -> 32x32
    pre = p.identity.preprocess
    arrays = p.dataset.splits["train"].arrays
    resized = pre.resize_crop_batch(torch.from_numpy(arrays).permute(0, 3, 1, 2)).round().to(torch.uint8).numpy()
    assert resized.shape[1:] == (3, 32, 32)
    mean, std = numpy_stats(resized)
    np.testing.assert_allclose(pre.mean, mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(pre.std, std, rtol=0, atol=1e-12)
    _, raw_std = numpy_stats(arrays.transpose(0, 3, 1, 2))
    assert (std < raw_std - 1e-3).all(), "the statistics are of the resized (smoothed) images"


def test_normalize_dataset_is_recorded_named_in_the_path_and_reused_without_streaming(tmp_path):
    cache = tmp_path / "cache"
    plain = extract(cache_dir=cache, **SYN, **TINY)
    passes = norm.passes
    res = extract(cache_dir=cache, normalize="dataset", **SYN, **TINY)
    assert norm.passes == passes + 1, "one pass over the train split"
    assert res["train"].path.name == "train.normdata.fp32.h5" and res["test"].path.name == "test.normdata.fp32.h5"
    X, _, meta = load_features(res["train"].path)
    Xw, _, _ = load_features(plain["train"].path)
    assert not np.allclose(X, Xw, atol=1e-4)
    ident = meta["identity"]
    assert ident.normalize == "dataset" and ident.image_size is None
    recorded = meta["provenance"]["normalization"]
    assert recorded["used"] == "dataset"
    assert recorded["weights"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert tuple(recorded["dataset"]["mean"]) == ident.preprocess.mean
    assert tuple(recorded["dataset"]["std"]) == ident.preprocess.std
    assert recorded["dataset"]["split"] == "train" and recorded["dataset"]["n_images"] == 24
    stats_file = cache / ident.data.label / "normstats.32-32-bilinear.json"
    assert recorded["dataset"]["file"] == str(stats_file)
    # the test split is normalised with the *train* split's statistics
    _, _, test_meta = load_features(res["test"].path)
    assert test_meta["identity"].preprocess == ident.preprocess
    # a rerun is a hit and reads the remembered statistics: no second pass, the file untouched
    mtime = stats_file.stat().st_mtime_ns
    again = extract(cache_dir=cache, normalize="dataset", **SYN, **TINY)
    assert {r.status for r in again.values()} == {"hit"}
    assert norm.passes == passes + 1 and stats_file.stat().st_mtime_ns == mtime


def test_changed_images_change_the_statistics_and_are_not_mixed_with_the_old_cache(tmp_path):
    root = make_folder(tmp_path / "pets")
    cache = tmp_path / "cache"
    request = dict(data="imagefolder", root=str(root), normalize="dataset", cache_dir=cache, workers=0, **TINY)
    first = extract(**request)
    before = load_features(first["train"].path).meta["identity"].preprocess
    passes = norm.passes
    img = root / "train" / "cat" / "000.png"
    Image.fromarray(np.full((30, 40, 3), 250, np.uint8)).save(img)     # a brighter image
    os.utime(img, ns=(1, 10**18))
    after = plan("cifar_resnet20", "imagefolder", weights="none", root=str(root), precision="fp32",
                 normalize="dataset", cache_dir=cache, progress=False, workers=0).identity.preprocess
    assert norm.passes == passes + 1
    assert all(a > b for a, b in zip(after.mean, before.mean))
    with pytest.raises(UserError, match="the preprocessing changed.*the images changed.*--overwrite"):
        extract(**request)


@pytest.mark.slow
def test_catalog_tells_the_extractions_apart(tmp_path):
    extract(cache_dir=tmp_path, **SYN, **TINY)
    extract(cache_dir=tmp_path, image_size=16, **SYN, **TINY)
    extract(cache_dir=tmp_path, normalize="dataset", **SYN, **TINY)
    described = sorted(g.describe() for g in feature_sets(tmp_path))
    assert len(described) == 3
    assert sum("--image-size 16" in d for d in described) == 1
    assert sum("--normalize dataset" in d for d in described) == 1
    (sized,) = select(CacheQuery(tmp_path, image_size=16))
    assert sized.identity.variant == "size16.fp32"
    (own,) = select(CacheQuery(tmp_path, image_size=32, normalize="weights"))        # the weights' own size
    assert own.identity.variant == "fp32"
    (data,) = select(CacheQuery(tmp_path, normalize="dataset"))
    assert data.identity.variant == "normdata.fp32"
    with pytest.raises(UserError, match="--image-size 64.*available:.*--image-size 16"):
        select(CacheQuery(tmp_path, image_size=64))
    X, _, meta = load_features(data="synthetic", model="cifar_resnet20.none", cache_dir=tmp_path, image_size=16)
    assert meta["identity"].image_size == 16


def test_cli_takes_both_flags(tmp_path, capsys):
    argv = ["--model", "cifar_resnet20.none", "--data", "synthetic", "--option", "n=16", "--precision", "fp32",
            "--cache-dir", str(tmp_path), "--no-progress", "--image-size", "16", "--normalize", "dataset"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "train.size16.normdata.fp32.h5 (extracted)" in out
    assert main(argv) == 0
    assert "train.size16.normdata.fp32.h5 (hit)" in capsys.readouterr().out


def test_identities_written_before_these_fields_read_as_the_defaults():
    ident = FeatureIdentity(DataRef("digits"), "m", None, Preprocess(), "fp32")
    old = ident.to_dict()
    del old["image_size"], old["normalize"]
    assert FeatureIdentity.from_dict(old) == ident and ident.variant == ""
    new = FeatureIdentity(DataRef("digits"), "m", None, Preprocess(), "fp32", image_size=64, normalize="dataset")
    assert FeatureIdentity.from_dict(new.to_dict()) == new and new.variant == "size64.normdata"


def test_finetune_trains_at_the_asked_size_in_its_own_folders(tmp_path):
    from finetune import finetune

    out = finetune("cifar_resnet20", "synthetic", weights="none", dataset_options={"n": 16}, epochs=1, batch_size=8,
                   warmup_epochs=0, progress=False, precision="fp32", image_size=16,
                   results_dir=tmp_path / "results", runs_dir=tmp_path / "runs")
    ident = FeatureIdentity.from_dict(out.result["identity"])
    assert ident.image_size == 16 and ident.preprocess.crop == 16
    assert "size16.fp32" in out.run_dir.parts and "size16.fp32" in out.path.parts
