"""The model zoo: timm/<arch>[.<tag>] built from timm, every torchvision classification model, offline.

Nothing here downloads: timm and torchvision networks are random init (``--weights none``) or a
state dict the test writes itself; the hub's download functions are replaced by ones that fail.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

timm = pytest.importorskip("timm")

from extract import load_features  # noqa: E402
from extract.api import extract  # noqa: E402
from extract.cli import main  # noqa: E402
from extract.core.errors import UserError  # noqa: E402
from extract.registry.backbone import build_on_meta  # noqa: E402
from extract.registry.models import (PENULTIMATE, Backbone, expand_taps, get_spec, list_models,  # noqa: E402
                                     load_backbone, measure_dims, model_names, resolve_weights)
from extract.store.modelref import ModelRef  # noqa: E402
from extract.store.preprocess import Preprocess  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TIMM_SAMPLE = ["timm/resnet10t", "timm/convnext_atto", "timm/efficientnet_b0", "timm/vit_tiny_patch16_224",
               "timm/vit_small_patch14_dinov2", "timm/deit_tiny_distilled_patch16_224", "timm/eva02_tiny_patch14_224"]
TV_SAMPLE = ["alexnet", "googlenet", "inception_v3", "squeezenet1_1", "shufflenet_v2_x0_5", "mnasnet0_5",
             "regnet_x_400mf", "wide_resnet50_2", "vgg11", "maxvit_t", "swin_t", "vit_b_16"]


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch, tmp_path):
    """Any download attempt fails the test; the torch.hub cache is an empty folder."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))


# --- names ----------------------------------------------------------------------------------------

def test_a_timm_name_keeps_its_tag_as_the_weights():
    ref = ModelRef.parse("timm/convnext_tiny.fb_in22k_ft_in1k")
    assert (ref.arch, ref.weights) == ("timm/convnext_tiny", "fb_in22k_ft_in1k")
    spec = get_spec("timm/convnext_tiny")
    assert spec.name == "timm/convnext_tiny" and spec.family == "timm"
    assert spec.default_weights == timm.models.get_pretrained_cfg("convnext_tiny").tag
    assert {"fb_in22k_ft_in1k", "in12k_ft_in1k_384", "fb_in1k"} <= set(spec.weights)
    tag = spec.weight("fb_in22k_ft_in1k")
    assert tag.source == "hf" and tag.hf_repo == "timm/convnext_tiny.fb_in22k_ft_in1k"
    assert spec.weight("DEFAULT") is spec.weights[spec.default_weights]
    with pytest.raises(UserError, match="did you mean"):
        spec.weight("fb_in22k_ft_in1")
    with pytest.raises(UserError, match="timm/convnext_tiny"):
        get_spec("timm/convnext_tinyy")


def test_timm_tags_build_their_own_network():
    spec = get_spec("timm/convnext_tiny")
    assert build_on_meta(spec.weight("in12k").build).num_classes == 11821   # its own classifier
    assert build_on_meta(spec.weight("fb_in1k").build).num_classes == 1000
    dino = get_spec("timm/vit_small_patch14_dinov2")
    assert dino.preprocess.crop == 518 and build_on_meta(dino.build).patch_embed.img_size == (518, 518)


def _timm_eval_preprocess(name: str) -> Preprocess:
    cfg = timm.models.get_pretrained_cfg(name)
    data = timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict())
    size = data["input_size"][-1]
    return Preprocess(math.floor(size / data["crop_pct"]), size, data["interpolation"], tuple(data["mean"]),
                      tuple(data["std"]), data["crop_mode"])


@pytest.mark.parametrize("name", TIMM_SAMPLE)
def test_timm_sample_resolves_preprocessing_and_measures_taps_on_meta(name, tmp_path):
    spec = get_spec(name)
    arch = name.split("/", 1)[1]
    assert spec.preprocess == _timm_eval_preprocess(arch)
    for tag, w in list(spec.weights.items())[:3]:
        assert w.preprocess == _timm_eval_preprocess(f"{arch}.{tag}")
    layers = expand_taps(spec, ["all"])
    assert layers[0] == PENULTIMATE and len(layers) > 3
    dims = measure_dims(spec, layers)
    net = build_on_meta(spec.build)
    assert dims[PENULTIMATE] == net.head_hidden_size if hasattr(net, "head_hidden_size") else net.num_features
    info = net.feature_info
    for layer in layers[1:]:
        module = spec.taps[layer]
        assert dims[layer] == next(f["num_chs"] for f in info if f["module"] == module)
    if hasattr(net, "num_prefix_tokens"):   # a transformer: every block tap names its pooling
        assert all(":" in t for t in layers[1:])
    assert not list((tmp_path / "torch-home").glob("**/*"))


@pytest.mark.slow
@pytest.mark.parametrize("name", TV_SAMPLE)
def test_torchvision_sample_resolves_each_weights_transforms_and_taps_on_meta(name):
    import torchvision

    assert name not in list_models() and name in model_names("*")
    spec = get_spec(name)
    enum = torchvision.models.get_model_weights(name)
    for member in enum:
        t = member.transforms()
        pre = spec.weight(member.name).preprocess
        assert (pre.resize, pre.crop, pre.interpolation) == (t.resize_size[0], t.crop_size[0], t.interpolation.value)
        assert pre.mean == tuple(t.mean) and pre.std == tuple(t.std)
    assert spec.default_weights == enum.DEFAULT.name
    head = build_on_meta(spec.build).get_submodule(spec.head_path)
    assert getattr(head, "out_features", getattr(head, "out_channels", None)) == 1000
    layers = expand_taps(spec, ["all"])
    net = build_on_meta(spec.build)
    bb = Backbone(spec, _headless(net, spec.head_path), layers, weights="none", weights_file=None,
                  weights_sha256=None, preprocess=spec.preprocess, load_report={})
    crop = spec.preprocess.crop
    out = bb(torch.empty(2, 3, crop, crop, device="meta"))
    assert {k: tuple(v.shape) for k, v in out.items()} == {k: (2, d) for k, d in bb.dims.items()}
    if name in ("vit_b_16", "swin_t"):   # tokens / channels-last maps: no pooled stage taps
        assert layers == [PENULTIMATE]
    else:
        assert len(layers) >= 4


def _headless(net, path):
    parent, _, leaf = path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, torch.nn.Identity())
    return net


def test_torchvision_weights_build_the_network_they_fit():
    vit = get_spec("vit_b_16")
    assert vit.fixed_input and vit.input_size == 224
    big = build_on_meta(vit.weight("IMAGENET1K_SWAG_E2E_V1").build)
    assert big.encoder.pos_embedding.shape[1] == (384 // 16) ** 2 + 1
    inception = build_on_meta(get_spec("inception_v3").build)
    assert inception.transform_input and inception.AuxLogits is None


def test_existing_names_keep_their_taps():
    assert get_spec("resnet50").taps == {f"layer{i}": f"layer{i}" for i in range(1, 5)}
    assert list(get_spec("mobilenet_v3_large").taps) == ["stage1", "stage2", "stage3", "stage4"]
    assert get_spec("resnet50").default_taps is None


def test_list_models_filters_with_a_glob(capsys):
    assert main(["--list-models", "timm/resnet1*t"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("timm/resnet10t "))
    assert line.split()[1:4] == ["512", "176", "c3_in1k"]
    assert main(["--list-models", "vit_b*"]) == 0
    out = capsys.readouterr().out
    assert next(l for l in out.splitlines() if l.startswith("vit_b_16 ")).split()[1:3] == ["768", "224"]
    assert main(["--list-models"]) == 0
    out = capsys.readouterr().out
    assert "resnet50 " in out and "timm/" in out and "timm/resnet10t" not in out and "vit_b_16" not in out
    assert main(["--list-models", "timm/*"]) == 0   # too many to describe: names and a hint
    out = capsys.readouterr().out
    assert "timm/resnet10t\n" in out and "narrow the pattern" in out


# --- extraction, random init -----------------------------------------------------------------------

def _opts(tmp_path, **kw):
    return dict(data="synthetic", dataset_options={"n": 24}, cache_dir=tmp_path / "cache", weights="none",
                progress=False, image_size=32, **kw)


def test_timm_cnn_random_init_extracts_several_taps_in_one_pass(tmp_path):
    layers = expand_taps(get_spec("timm/resnet10t"), ["all"])
    assert layers == [PENULTIMATE, "act1", "layer1", "layer2", "layer3", "layer4"]
    res = extract(model="timm/resnet10t", layers=layers, **_opts(tmp_path))
    path = res["train"].path
    assert path.relative_to(tmp_path / "cache").parts[1:] == ("timm", "resnet10t.none", "train.size32.h5")
    widths = {PENULTIMATE: 512, "act1": 64, "layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    for layer, width in widths.items():
        f = load_features(path, layer=layer)
        assert f.X.shape == (len(f.y), width) and np.isfinite(f.X).all()
    meta = load_features(path).meta
    identity = meta["identity"]
    assert identity.model == "timm/resnet10t.none" and identity.arch == "timm/resnet10t"
    assert identity.preprocess.mean == get_spec("timm/resnet10t").preprocess.mean
    assert identity.preprocess.interpolation == "bicubic" and identity.preprocess.crop == 32
    assert meta["provenance"]["weights_preprocess"]["crop"] == 176
    np.testing.assert_allclose(load_features(path, layer="layer4").X, load_features(path).X, rtol=1e-4, atol=1e-5)
    again = extract(model="timm/resnet10t", layers=layers, **_opts(tmp_path))
    assert {r.status for r in again.values()} == {"hit"}


def test_timm_vit_random_init_pools_tokens_as_its_tap_names_say(tmp_path):
    spec = get_spec("timm/vit_tiny_patch16_224")
    assert expand_taps(spec, ["all"]) == [PENULTIMATE, *(f"blocks.{i}:cls" for i in range(12))]
    layers = [PENULTIMATE, "blocks.1:cls", "blocks.1:mean", "blocks.5:mean"]
    res = extract(model="timm/vit_tiny_patch16_224", layers=layers, precision="fp32", **_opts(tmp_path))
    path = res["train"].path
    feats = {layer: load_features(path, layer=layer).X for layer in layers}
    assert all(x.shape[1] == 192 for x in feats.values())
    assert not np.allclose(feats["blocks.1:cls"], feats["blocks.1:mean"])
    assert load_features(path).meta["identity"].model == "timm/vit_tiny_patch16_224.none"
    # the same network, run here by timm, gives the same pooled tokens
    bb = _seeded_backbone("timm/vit_tiny_patch16_224", layers)
    from extract.registry.datasets import load_dataset
    images = load_dataset("synthetic", n=24).splits["train"].arrays
    pre = load_features(path).meta["identity"].preprocess
    x = pre.normalize(pre.resize_crop_batch(torch.from_numpy(images).permute(0, 3, 1, 2)))
    net, store = bb.net, {}
    handle = net.blocks[1].register_forward_hook(lambda m, i, o: store.__setitem__("b1", o))
    with torch.inference_mode():
        pen = net.forward_head(net.forward_features(x), pre_logits=True)
    handle.remove()
    np.testing.assert_allclose(feats[PENULTIMATE], pen.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats["blocks.1:cls"], store["b1"][:, 0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(feats["blocks.1:mean"], store["b1"][:, 1:].mean(1).numpy(), rtol=1e-4, atol=1e-4)
    with pytest.raises(UserError, match=r"blocks\.1:cls or blocks\.1:mean"):
        expand_taps(spec, ["blocks.1"])


def _seeded_backbone(name, layers):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return load_backbone(name, weights="none", layers=layers)


def test_an_early_timm_tap_stops_the_forward():
    bb = load_backbone("timm/resnet10t", weights="none", layers=["layer1"])
    calls = []
    handle = bb.net.layer3.register_forward_pre_hook(lambda m, a: calls.append(1))
    with torch.inference_mode():
        assert bb(torch.randn(2, 3, 32, 32))["layer1"].shape == (2, 64)
    handle.remove()
    assert calls == []


def test_a_fixed_size_network_refuses_another_image_size(tmp_path):
    with pytest.raises(UserError, match="runs at 224x224 only"):
        extract(model="vit_b_16", layers=None, **_opts(tmp_path))


# --- weights ----------------------------------------------------------------------------------------

def _jpeg_folder(hymenoptera: Path, root: Path, per_class: int = 3) -> Path:
    for cls in ("ants", "bees"):
        (root / "train" / cls).mkdir(parents=True)
        for p in sorted((hymenoptera / "val" / cls).glob("*.jpg"))[:per_class]:
            shutil.copy(p, root / "train" / cls / p.name)
    return root


def _timm_features(arch: str, state: dict, paths: list[str]) -> np.ndarray:
    """What timm itself computes: its model with the file's weights and its own eval transform."""
    net = timm.create_model(arch, pretrained=False)
    net.load_state_dict(state)
    net.eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config(model=net))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return net.forward_head(net.forward_features(x), pre_logits=True).numpy()


@pytest.mark.parametrize("arch,suffix", [("resnet10t", ".safetensors"), ("vit_tiny_patch16_224", ".pth")])
def test_a_local_state_dict_gives_timms_own_features(arch, suffix, hymenoptera, tmp_path):
    torch.manual_seed(1)
    state = timm.create_model(arch, pretrained=False).state_dict()
    file = tmp_path / f"{arch}{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(file))
    else:
        torch.save(state, file)
    root = _jpeg_folder(hymenoptera, tmp_path / "images", per_class=2 if arch.startswith("vit") else 3)
    resolved = resolve_weights(f"timm/{arch}", str(file))
    assert resolved.file == file.resolve() and resolved.tag.startswith(arch)
    res = extract(model=f"timm/{arch}", weights=str(file), data="imagefolder", root=str(root),
                  cache_dir=tmp_path / "cache", precision="fp32", progress=False)
    f = load_features(res["train"].path)
    identity = f.meta["identity"]
    assert identity.weights_sha256 == resolved.sha256 and len(identity.weights_sha256) == 64
    assert identity.model == f"timm/{arch}.{resolved.tag}"
    paths = [f.meta["paths"][i] for i in range(len(f.X))]
    want = _timm_features(arch, state, paths)
    cos = (f.X * want).sum(1) / np.linalg.norm(f.X, axis=1) / np.linalg.norm(want, axis=1)
    assert cos.min() >= 0.9999, cos


def test_timm_preprocessing_feeds_the_network_timms_own_tensors(hymenoptera):
    """Spec preprocessing vs timm.data.create_transform on real JPEGs: PIL identical, the JPEG tensor
    decoder within its resize differences. A center-crop and a squash (384 px, crop_pct 1) config."""
    from extract.registry.images import decode_jpeg_file

    files = sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[:4]
    for name in ("timm/resnet10t", "timm/convnext_tiny.fb_in22k_ft_in1k_384"):
        spec = get_spec(name.split(".")[0])
        tag = name.partition(".")[2] or spec.default_weights
        pre = spec.weight(tag).preprocess
        assert pre.crop_mode == ("squash" if tag.endswith("384") else "center")
        cfg = timm.models.get_pretrained_cfg(f"{spec.name[5:]}.{tag}")
        transform = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg.to_dict()))
        for p in files:
            want = transform(Image.open(p).convert("RGB"))
            pil = pre.normalize(pre.resize_crop_pil(Image.open(p).convert("RGB"))[None])[0]
            torch.testing.assert_close(pil, want, rtol=0, atol=1e-5)
            decoded = decode_jpeg_file(str(p))
            if decoded is not None:
                tensor = pre.normalize(pre.resize_crop_tensor(decoded)[None])[0]
                assert tensor.shape == want.shape
                assert (tensor - want).abs().mean() < 0.02 and (tensor - want).abs().max() < 0.5


@pytest.mark.slow
def test_a_missing_hub_file_offline_is_one_line_and_exit_2(tmp_path):
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home),
           "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "extract", "--model", "timm/resnet10t", "--data", "synthetic",
                           "--option", "n=8", "--cache-dir", str(tmp_path / "cache")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "timm/resnet10t.c3_in1k/model.safetensors" in lines[0] and str(hf_home / "hub") in lines[0]
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").glob("**/*.h5"))


def test_weights_on_disk_reads_the_hugging_face_cache(monkeypatch, tmp_path):
    from extract.registry import checkpoints
    from extract.registry.models import describe_model

    monkeypatch.setattr(checkpoints, "hf_cached", lambda repo, filenames=checkpoints.HF_FILES: None)
    assert describe_model("timm/resnet10t")["weights_on_disk"] is False
    seen = []

    def cached(repo, filenames=checkpoints.HF_FILES):
        seen.append(repo)
        return tmp_path / "model.safetensors"
    monkeypatch.setattr(checkpoints, "hf_cached", cached)
    assert describe_model("timm/resnet10t")["weights_on_disk"] is True and seen == ["timm/resnet10t.c3_in1k"]


# --- the rest: fine-tuning, predict, OpenVINO -------------------------------------------------------------

def test_finetune_resets_a_timm_classifier_with_timm():
    from finetune.model import Classifier

    for name in ("timm/convnext_atto", "timm/vit_tiny_patch16_224"):
        bb = load_backbone(name, weights="none")
        model = Classifier(bb.net, bb.head_path, bb.dims[PENULTIMATE], 3, embed=bb.spec.embed, reset=True)
        assert isinstance(model.head, torch.nn.Linear) and model.head.out_features == 3
        assert model.head.in_features == bb.dims[PENULTIMATE]
        with torch.no_grad():
            assert model(torch.randn(2, 3, 64, 64)).shape == (2, 3)


def test_probe_predict_rebuilds_the_timm_backbone(tmp_path):
    from probe.analyses.predict import backbone_for

    res = extract(model="timm/vit_tiny_patch16_224", layers=["blocks.2:mean"], precision="fp32", **_opts(tmp_path))
    f = load_features(res["train"].path, layer="blocks.2:mean")
    bb = backbone_for(f.meta["identity"], f.meta["provenance"], "blocks.2:mean")
    assert bb.name == "timm/vit_tiny_patch16_224" and bb.layers == ["blocks.2:mean"]
    from extract.registry.datasets import load_dataset
    images = load_dataset("synthetic", n=24).splits["train"].arrays[:4]
    pre = f.meta["identity"].preprocess
    with torch.inference_mode():
        x = pre.normalize(pre.resize_crop_batch(torch.from_numpy(images).permute(0, 3, 1, 2)))
        np.testing.assert_allclose(bb(x)["blocks.2:mean"].numpy(), f.X[:4], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,layers", [("timm/resnet10t", [PENULTIMATE, "layer2"]),
                                         ("timm/vit_tiny_patch16_224", [PENULTIMATE, "blocks.3:cls", "blocks.3:mean"])])
def test_openvino_converts_timm_backbones(name, layers, tmp_path):
    pytest.importorskip("openvino")
    torch_run = extract(model=name, layers=layers, precision="fp32", **_opts(tmp_path))["train"].path
    ov_run = extract(model=name, layers=layers, precision="fp32", engine="openvino", **_opts(tmp_path))["train"].path
    assert ov_run != torch_run
    for layer in layers:
        a, b = load_features(torch_run, layer=layer).X, load_features(ov_run, layer=layer).X
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-3)
