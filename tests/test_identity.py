"""The feature identity: one value decides paths, attributes and the cache-hit rule."""

import dataclasses

import h5py
import pytest

from extract.store.identity import DataRef, FeatureIdentity, differences, verdict
from extract.store.preprocess import Preprocess
from probe_helpers import toy_identity

BASE = FeatureIdentity(data=DataRef("imagefolder", "/data/a/pets"), model="resnet50.swav", weights_sha256="ab" * 32,
                       preprocess=Preprocess(256, 224, "bicubic"), precision="bf16", precision_requested="auto",
                       dtype="float32", taps=("penultimate", "layer3"))

# One changed value per component: each must turn a hit into a named conflict.
CHANGES = {
    "data": DataRef("imagefolder", "/data/b/pets"),
    "model": "resnet50.dino",
    "weights_sha256": "cd" * 32,
    "preprocess": Preprocess(256, 224, "bilinear"),
    "precision": "fp32",
    "precision_requested": "bf16",
    "dtype": "float16",
    "format": 1,
    "image_size": 32,
    "normalize": "dataset",
    "engine": "openvino",
    "decoder": "pil",
    "calibration": "train:300:0123456789ab",
}


def test_every_component_but_taps_is_covered_by_a_change():
    assert set(CHANGES) == {f.name for f in dataclasses.fields(FeatureIdentity)} - {"taps"}


def test_round_trip_through_hdf5_attributes(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs.update(BASE.to_attrs())
    with h5py.File(tmp_path / "x.h5", "r") as f:
        assert FeatureIdentity.from_attrs(f.attrs) == BASE
        assert f.attrs["model"] == "resnet50.swav" and f.attrs["precision"] == "bf16"


def test_files_of_an_older_format_have_no_identity(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as f:
        f.attrs["key"] = "{}"
    with h5py.File(tmp_path / "old.h5", "r") as f:
        assert FeatureIdentity.from_attrs(f.attrs) is None
    assert verdict(None, "", BASE, "").conflicts == ("format",)


def test_equal_identity_and_images_is_a_hit_and_fewer_taps_still_hit():
    assert verdict(BASE, "f", BASE, "f").hit
    assert verdict(BASE, "f", BASE.with_taps(["layer3"]), "f").hit


def test_a_missing_tap_is_not_a_hit_but_no_conflict():
    v = verdict(BASE, "f", BASE.with_taps(["penultimate", "layer1"]), "f")
    assert not v.hit and not v.conflicts and v.missing_taps == ("layer1",)


@pytest.mark.parametrize("component", sorted(CHANGES))
def test_every_component_changes_the_hit_decision(component):
    other = dataclasses.replace(BASE, **{component: CHANGES[component]})
    v = verdict(BASE, "f", other, "f")
    assert not v.hit and v.conflicts == (component,)
    assert differences(BASE, other) == [component]


def test_changed_images_are_a_conflict():
    assert verdict(BASE, "f", BASE, "g").conflicts == ("fingerprint",)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_default_request_has_one_path_whatever_precision_auto_chose(tmp_path, precision):
    ident = toy_identity(dataset="digits", model="efficientnet_lite0", precision=precision)
    assert ident.cache_path(tmp_path, "train") == tmp_path / "digits" / "efficientnet_lite0" / "train.h5"
    assert ident.results_dir(tmp_path, "penultimate") == tmp_path / "digits" / "efficientnet_lite0" / "penultimate"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_explicit_precision_and_dtype_are_named_in_paths(tmp_path, precision):
    ident = toy_identity(dataset="digits", model="m", precision=precision, precision_requested=precision,
                         dtype="float16")
    assert ident.cache_path(tmp_path, "test").name == f"test.{precision}.float16.h5"
    assert ident.results_dir(tmp_path, "layer3") == tmp_path / "digits" / "m" / f"{precision}.float16" / "layer3"


def test_engine_is_named_in_paths_and_old_files_read_as_torch(tmp_path):
    ident = toy_identity(dataset="digits", model="m", engine="openvino")
    assert ident.variant == "openvino" and ident.cache_path(tmp_path, "train").name == "train.openvino.h5"
    both = toy_identity(dataset="digits", model="m", precision="bf16", precision_requested="bf16", engine="openvino")
    assert both.variant.endswith("bf16.openvino")
    old = ident.to_dict()
    del old["engine"]
    assert FeatureIdentity.from_dict(old).engine == "torch"
    assert FeatureIdentity.from_dict(ident.to_dict()) == ident


def test_same_named_folders_get_different_readable_labels():
    a, b = DataRef("imagefolder", "/x/a/pets"), DataRef("imagefolder", "/x/b/pets")
    assert a.label.startswith("pets-") and b.label.startswith("pets-") and a.label != b.label
    assert a.matches("pets") and a.matches(a.label) and a.matches("/x/a/pets") and not a.matches("cats")


def test_dataset_options_are_part_of_the_label():
    assert DataRef("synthetic", None, (("n", 40),)).label != DataRef("synthetic", None, (("n", 80),)).label
    assert DataRef("digits").label == "digits"
