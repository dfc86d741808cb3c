"""Checkpoint loading: published layouts, hub cache, offline errors, hashes, the akamaster CIFAR ResNets."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extract.registry import checkpoints
from extract.core.errors import UserError
from extract.registry.models import build_network, get_spec, load_backbone, load_classifier


@pytest.fixture(scope="module")
def trunk() -> dict[str, torch.Tensor]:
    """A random ResNet-50 trunk state dict (no classifier)."""
    torch.manual_seed(1)
    net = build_network("resnet50")
    for p in net.parameters():
        torch.nn.init.normal_(p)
    return {k: v.clone() for k, v in net.state_dict().items()}


def _shifted(sd, delta=1.0):
    return {k: (v + delta if v.is_floating_point() else v) for k, v in sd.items()}


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


def _layout(name, trunk):
    """A self-supervised method's published checkpoint layout, built around `trunk`."""
    other = _shifted(trunk) if name in ("mocov2", "dino_full", "byol_mmselfsup") else {}
    return {
        "mocov2": {"epoch": 800, "arch": "resnet50", "optimizer": {"state": {}},
                   "state_dict": {**_prefixed(trunk, "module.encoder_q."), **_prefixed(other, "module.encoder_k."),
                                  "module.encoder_q.fc.0.weight": torch.randn(8, 2048),
                                  "module.encoder_q.fc.2.weight": torch.randn(4, 8),
                                  "module.queue": torch.randn(4, 16), "module.queue_ptr": torch.zeros(1)}},
        "dino": dict(trunk),
        "dino_full": {"student": _prefixed(other, "module.backbone."), "epoch": 100,
                      "teacher": {**_prefixed(trunk, "backbone."), "head.mlp.0.weight": torch.randn(8, 2048)},
                      "args": argparse.Namespace(arch="resnet50")},
        "swav": {**_prefixed(trunk, "module."), "module.projection_head.0.weight": torch.randn(8, 2048),
                 "module.prototypes.weight": torch.randn(30, 8)},
        "barlowtwins": dict(trunk),
        "vicreg": dict(trunk),
        "simclr_vissl": {"phase_idx": 999, "classy_state_dict": {"base_model": {"model": {
            "trunk": _prefixed(trunk, "_feature_blocks."),
            "heads": {"0.clf.0.weight": torch.randn(8, 2048)}}}}},
        "simclr_converted": {"state_dict": {**trunk, "fc.weight": torch.randn(1000, 2048),
                                            "fc.bias": torch.zeros(1000)}},
        "byol_mmselfsup": {"meta": {"epoch": 200}, "state_dict": {
            **_prefixed(trunk, "online_net.0."), **_prefixed(trunk, "backbone."),
            **_prefixed(other, "target_net.0."), "online_net.1.mlp.0.weight": torch.randn(8, 2048),
            "neck.mlp.0.weight": torch.randn(8, 2048), "head.predictor.mlp.0.weight": torch.randn(8, 8)}},
        "byol_online_network": {"online_network": {**_prefixed(trunk, "encoder."),
                                                   "projection.net.0.weight": torch.randn(8, 2048)}},
    }[name]


@pytest.fixture(scope="module")
def resnet50_net():
    return build_network("resnet50")


@pytest.mark.parametrize("layout", ["mocov2", "dino", "dino_full", "swav", "barlowtwins", "vicreg", "simclr_vissl",
                                    "simclr_converted", "byol_mmselfsup", "byol_online_network"])
@pytest.mark.slow
def test_published_layouts_remap_to_the_trunk(layout, trunk, resnet50_net, tmp_path):
    path = tmp_path / f"{layout}.pth"
    torch.save(_layout(layout, trunk), path)
    state, report = checkpoints.fit_state_dict(checkpoints.read_checkpoint(path), resnet50_net)
    assert report["missing"] == [] and report["unexpected"] == []
    assert state.keys() == trunk.keys()
    assert all(torch.equal(state[k], trunk[k]) for k in trunk)   # the online/teacher/query encoder, not its twin
    heads = {"mocov2": ["fc.0.weight", "fc.2.weight"], "swav": ["projection_head.0.weight", "prototypes.weight"],
             "simclr_converted": ["fc.bias", "fc.weight"], "dino_full": ["head.mlp.0.weight"],
             "byol_mmselfsup": ["head.predictor.mlp.0.weight", "neck.mlp.0.weight"]}
    if layout in heads:
        assert report["dropped"] == heads[layout]


def test_load_backbone_from_a_local_moco_file(trunk, tmp_path, capsys):
    path = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(_layout("mocov2", trunk), path)
    bb = load_backbone("resnet50", weights=str(path), layers=["layer4", "penultimate"])
    net_sd = bb.net.state_dict()
    assert all(torch.equal(net_sd[k], trunk[k]) for k in trunk)
    assert bb.weights == "moco_v2_800ep_pretrain-" + hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    assert bb.weights_file == str(path.resolve())
    assert bb.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert bb.load_report["prefix"] == "module.encoder_q." and bb.load_report["ignored"] > 300
    assert bb.preprocess == get_spec("resnet50").preprocess
    assert "warning" not in capsys.readouterr().err


def test_missing_trunk_weights_are_refused_unless_allowed(trunk, resnet50_net, tmp_path, caplog):
    partial = {k: v for k, v in trunk.items() if not k.startswith("layer4.2.")}
    partial["layer9.extra"] = torch.zeros(1)
    with pytest.raises(UserError, match="partial.pth lacks 15 of the network's 265 .*--allow-missing-weights"):
        checkpoints.load_into(resnet50_net, partial, source="partial.pth")
    with caplog.at_level("WARNING", logger="extract"):
        report = checkpoints.load_into(resnet50_net, partial, source="partial.pth", allow_missing=True)
    assert report["missing"] and all(k.startswith("layer4.2.") for k in report["missing"])
    assert report["unexpected"] == ["layer9.extra"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "partial.pth lacks" in said and "layer9.extra" in said


def test_checkpoints_that_do_not_fit_give_clear_errors(tmp_path):
    small = build_network("resnet18").state_dict()
    with pytest.raises(UserError, match="does not fit.*shape"):
        checkpoints.load_into(build_network("resnet50"), small)
    with pytest.raises(UserError, match="no tensor whose name matches"):
        checkpoints.load_into(build_network("resnet18"), {"foo.weight": torch.zeros(2)})
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="cannot read"):
        load_backbone("resnet18", weights=str(junk))


def test_sha256_is_cached_per_path_and_follows_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    first = checkpoints.sha256_file(f)
    assert first == hashlib.sha256(b"abc").hexdigest()
    assert checkpoints.sha256_file(f) == first
    assert any(key[0] == str(f.resolve()) for key in checkpoints._SHA_CACHE)
    f.write_bytes(b"abcd")
    assert checkpoints.sha256_file(f) == hashlib.sha256(b"abcd").hexdigest()


def test_sha256_is_remembered_across_processes_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"weights")
    digest = checkpoints.sha256_file(f)
    checkpoints._SHA_CACHE.clear()   # as in a new process: only the file on disk remembers
    known = json.loads(checkpoints.sha_cache_file().read_text())
    (key,) = [k for k in known if k.startswith(str(f.resolve()) + "|")]
    known[key] = "remembered"
    checkpoints.sha_cache_file().write_text(json.dumps(known))
    assert checkpoints.sha256_file(f) == "remembered"   # read back, not recomputed
    os.utime(f, ns=(1, 1))
    assert checkpoints.sha256_file(f) == digest          # another mtime: hashed again


def test_missing_hub_file_offline_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = str(tmp_path / "hub" / "checkpoints")
    with pytest.raises(UserError) as e:
        load_backbone("resnet50", weights="swav", download=False)
    assert "swav_800ep_pretrain.pth.tar" in str(e.value) and folder in str(e.value)
    monkeypatch.setenv("FEATPROBE_OFFLINE", "1")
    with pytest.raises(UserError, match="resnet20-12fca82f.th"):
        load_backbone("cifar_resnet20")


def test_unreachable_server_is_a_user_error_not_a_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv("FEATPROBE_OFFLINE", raising=False)
    with pytest.raises(UserError) as e:   # nothing listens on the discard port
        checkpoints.hub_file("http://127.0.0.1:9/some_weights.pth")
    assert "some_weights.pth" in str(e.value) and str(tmp_path / "hub" / "checkpoints") in str(e.value)
    assert not (tmp_path / "hub" / "checkpoints" / "some_weights.pth").exists()


def test_registered_weights_are_read_from_the_hub_cache(trunk, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(dict(trunk), folder / "barlowtwins_resnet50.pth")
    bb = load_backbone("resnet50", weights="barlowtwins", download=False)
    assert bb.weights == "barlowtwins" and bb.weights_file == str(folder / "barlowtwins_resnet50.pth")
    assert torch.equal(bb.net.state_dict()["conv1.weight"], trunk["conv1.weight"])
    # a file whose name carries a hash prefix must match it
    torch.save(dict(trunk), folder / "resnet18-f37072fd.pth")
    with pytest.raises(UserError, match="corrupt or not the published file"):
        load_backbone("resnet18", weights="IMAGENET1K_V1", download=False)


class _WritesMarker:
    """Unpickling it creates a file: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_hostile_file_under_a_registry_name_runs_no_code(trunk, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    folder = tmp_path / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    marker = tmp_path / "ran"
    torch.save({**_layout("swav", trunk), "extra": _WritesMarker(marker)}, folder / "swav_800ep_pretrain.pth.tar")
    with pytest.raises(UserError, match=r"cannot read .*swav_800ep_pretrain\.pth\.tar as a weights-only PyTorch "
                                        r"checkpoint \(Unsupported global: GLOBAL .*\)") as e:
        load_backbone("resnet50.swav", download=False)
    assert "\n" not in str(e.value) and not marker.exists()
    from extract.cli import main
    assert main(["--model", "resnet50.swav", "--data", "digits", "--cache-dir", str(tmp_path / "cache"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model resnet50.swav: cannot read") and len(err.strip().splitlines()) == 1
    assert not marker.exists()


def test_published_extras_load_weights_only(trunk, tmp_path):
    path = tmp_path / "dino_full.pth"
    torch.save({**_layout("dino_full", trunk), "best_acc": np.float64(0.75), "steps": np.arange(3),
                "args": argparse.Namespace(arch="resnet50", lr=np.float32(0.1))}, path)
    obj = checkpoints.read_checkpoint(path)
    assert obj["best_acc"] == 0.75 and list(obj["steps"]) == [0, 1, 2] and obj["args"].arch == "resnet50"


def test_registry_sha256_mismatch_is_refused_before_reading(trunk, tmp_path, monkeypatch):
    from dataclasses import replace
    from extract.registry.models import ResolvedWeights, build_backbone
    spec = get_spec("resnet50")
    path = tmp_path / "swav_800ep_pretrain.pth.tar"
    torch.save(_WritesMarker(tmp_path / "ran"), path)
    published = replace(spec.weight("swav"), sha256="0" * 64)
    with pytest.raises(UserError, match="corrupt or not the published file"):
        build_backbone(ResolvedWeights(spec, "swav", path, published))
    assert not (tmp_path / "ran").exists()
    good = replace(published, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    with pytest.raises(UserError, match="Unsupported global"):   # the hash matches; the content is still refused
        build_backbone(ResolvedWeights(spec, "swav", path, good))
    assert not (tmp_path / "ran").exists()


@pytest.fixture(scope="module")
def resnet20_file(assets):
    path = assets / "cifar10-resnets-akamaster" / "resnet20-12fca82f.th"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_akamaster_checkpoint_loads_without_missing_or_unexpected_keys(resnet20_file):
    bb = load_backbone("cifar_resnet20", weights=str(resnet20_file), layers=["layer3", "penultimate"])
    assert bb.load_report["missing"] == [] and bb.load_report["unexpected"] == []
    assert bb.load_report["prefix"] == "module." and bb.load_report["dropped"] == ["linear.bias", "linear.weight"]
    assert bb.weights == "resnet20-12fca82f" and bb.weights_sha256.startswith("12fca82f")
    assert bb.dims == {"layer3": 64, "penultimate": 64}


@pytest.mark.slow
def test_akamaster_resnet20_classifies_real_cifar10_images(resnet20_file, cifar10_jpg):
    net = load_classifier("cifar_resnet20", weights=str(resnet20_file))
    pre = get_spec("cifar_resnet20").preprocess
    classes = sorted(os.listdir(cifar10_jpg / "test"))
    assert len(classes) == 10
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((cifar10_jpg / "test" / cls).iterdir())[:20]:
            images.append(pre.resize_crop_pil(Image.open(f).convert("RGB")))
            labels.append(label)
    with torch.inference_mode():
        pred = net(pre.normalize(torch.stack(images))).argmax(1)
    accuracy = (pred == torch.tensor(labels)).float().mean().item()
    assert accuracy >= 0.7   # chance is 0.1; 8.3% error on the PNG originals, ~80% on these quality-75 JPEGs
