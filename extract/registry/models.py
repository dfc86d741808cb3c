"""Backbone registry: architectures, their weights, and each weight's own preprocessing.

A :class:`ModelSpec` names an architecture, where its classifier sits, the
layers that can be tapped (widths are measured: backbone.measure_dims), and the weights it can load.
A :class:`WeightSpec` says where a weight comes from (a torchvision enum, a
published checkpoint URL cached by torch.hub, a pip package, or a local file)
and how images must be prepared for it. :func:`load_backbone` builds a frozen
:class:`Backbone` that returns pooled embeddings for several layers in one pass.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import math
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torchvision
from torch import nn

from extract.registry import builtin, checkpoints
from extract.registry.backbone import PENULTIMATE, Backbone, build_on_meta, measure_dims
from extract.core.errors import UserError
from extract.store.modelref import ModelRef
from extract.registry.spec import ALL_TAPS, ModelSpec, WeightSpec, tap_names
from extract.registry.weights import (ResolvedWeights, _file_tag, _package_file,  # noqa: F401 - re-exported
                                      names_a_file, resolve_for)
from extract.registry.timm_models import is_timm, timm_spec
from extract.store.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

IMAGENET_256_224 = Preprocess(256, 224, "bilinear", IMAGENET_MEAN, IMAGENET_STD)


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


def _tv(name: str, head: str, taps: dict[str, str], extra: Sequence[WeightSpec] = ()) -> None:
    weights, default = _tv_weights(name)
    weights.update({w.tag: w for w in extra})
    _register(ModelSpec(
        name=name, family="torchvision", build=lambda: torchvision.models.get_model(name, weights=None),
        head_path=head, taps=taps, weights=weights, default_weights=default,
        preprocess=IMAGENET_256_224, source=f"torchvision.models.{name}", aliases={"DEFAULT": default}))


_RESNET_TAPS = {f"layer{i}": f"layer{i}" for i in range(1, 5)}


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

_tv("resnet18", "fc", _RESNET_TAPS)
_tv("resnet34", "fc", _RESNET_TAPS)
_tv("resnet50", "fc", _RESNET_TAPS, extra=SSL_RESNET50)
_tv("resnet101", "fc", _RESNET_TAPS)
_tv("resnet152", "fc", _RESNET_TAPS)
_VGG_TAPS = {"pool5": "features", "fc6": "classifier.1", "fc7": "classifier.4"}
_tv("vgg16", "classifier.6", _VGG_TAPS)
_tv("vgg16_bn", "classifier.6", _VGG_TAPS)
_tv("densenet121", "classifier", {f"denseblock{i}": f"features.denseblock{i}" for i in range(1, 5)})
# stageN: last block at stride 4, 8, 16, 32
_tv("mobilenet_v3_large", "classifier.3",
    {"stage1": "features.3", "stage2": "features.6", "stage3": "features.12", "stage4": "features.16"})
_tv("efficientnet_b0", "classifier.1",
    {"stage1": "features.2", "stage2": "features.3", "stage3": "features.5", "stage4": "features.8"})
_tv("convnext_tiny", "classifier.2", {f"stage{i}": f"features.{2 * i - 1}" for i in range(1, 5)})
_tv("regnet_y_800mf", "fc", {f"stage{i}": f"trunk_output.block{i}" for i in range(1, 5)})


# --- every other torchvision classification model, built on demand ----------------------------------

@functools.lru_cache(maxsize=None)
def torchvision_names() -> tuple[str, ...]:
    """torchvision's classification models (``list_models(module=torchvision.models)``)."""
    return tuple(torchvision.models.list_models(module=torchvision.models))


def _tv_kwargs(name: str, member) -> dict:
    """The architecture torchvision's builder makes for these weights (it changes it before loading them)."""
    kwargs = {"num_classes": len(member.meta["categories"])}
    if name.startswith("vit_"):
        kwargs["image_size"] = member.meta["min_size"][0]
    if name in ("googlenet", "inception_v3"):   # auxiliary classifiers are dropped as torchvision does
        kwargs.update(transform_input=True, aux_logits=False, init_weights=False)
    return kwargs


def _tv_builder(name: str, kwargs: dict) -> Callable[[], nn.Module]:
    def build():
        return torchvision.models.get_model(name, weights=None, **kwargs)
    return build


def _tv_head(net: nn.Module, n_classes: int) -> str:
    """The classifier: the last Linear (or 1x1 Conv2d, SqueezeNet) with one output per class."""
    head = None
    for path, m in net.named_modules():
        if (isinstance(m, nn.Linear) and m.out_features == n_classes) or \
                (isinstance(m, nn.Conv2d) and m.out_channels == n_classes):
            head = path
    if head is None:
        raise UserError(f"cannot find the classifier of torchvision's {type(net).__name__}")
    return head


def _tv_stage_taps(net: nn.Module, head: str, size: int) -> dict[str, str]:
    """``stageK``: the last module of the network's body whose output is at stride 2**(K+1) (4, 8, 16, 32),
    found by one meta-device forward. The body is the network's top-level children, a container among
    them (``features``, ``layers``, ``trunk_output``, ``blocks``) opened one level; the classifier's branch
    is left out. {} when the body's outputs are not square NCHW maps (ViT tokens, Swin's NHWC)."""
    head_branch = head.split(".")[0]
    candidates = []
    for name, child in net.named_children():
        if name == head_branch:
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) >= 3:
            candidates += [(f"{name}.{n}", c) for n, c in child.named_children()]
        else:
            candidates.append((name, child))
    calls: list[tuple[str, tuple]] = []
    handles = [m.register_forward_hook(lambda mod, i, o, path=path: calls.append(
        (path, tuple(o.shape) if isinstance(o, torch.Tensor) else ())))
        for path, m in candidates]
    try:
        with torch.no_grad():
            net.eval()(torch.zeros(1, 3, size, size, device=next(net.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    taps: dict[int, str] = {}
    for path, shape in calls:
        if len(shape) == 3 or (len(shape) == 4 and shape[2] != shape[3]):
            return {}   # tokens or channels-last maps: not pooled correctly by a global average
        if len(shape) == 4 and shape[2] > 1:   # a 1x1 map is the global pool: the penultimate already
            level = round(math.log2(size / shape[2]))
            if level >= 2:
                taps[level] = path
    return {f"stage{level - 1}": path for level, path in sorted(taps.items())}


@functools.lru_cache(maxsize=None)
def _tv_spec(name: str) -> ModelSpec:
    enum = torchvision.models.get_model_weights(name)
    weights = {m.name: WeightSpec(m.name, "torchvision", _tv_preprocess(m), url=m.url,
                                  build=_tv_builder(name, _tv_kwargs(name, m)), num_classes=len(m.meta["categories"]))
               for m in enum if m.name != "IMAGENET1K_FEATURES"}
    default = enum.DEFAULT.name
    build = _tv_builder(name, _tv_kwargs(name, enum.DEFAULT))
    preprocess = weights[default].preprocess
    net = build_on_meta(build)
    head = _tv_head(net, len(enum.DEFAULT.meta["categories"]))
    if all(hasattr(net, f"layer{i}") for i in range(1, 5)):   # ResNet, ResNeXt, Wide ResNet: as resnet50
        taps = dict(_RESNET_TAPS)
    elif name.startswith("vgg"):
        taps = dict(_VGG_TAPS)
    else:
        try:
            taps = _tv_stage_taps(net, head, preprocess.crop)
        except Exception:  # noqa: BLE001 - a forward meta tensors cannot run: penultimate only
            taps = {}
    fixed = name.startswith("vit_")   # a position embedding per patch of its own input size
    return ModelSpec(name=name, family="torchvision", build=build, head_path=head, taps=taps, weights=weights,
                     default_weights=default, preprocess=preprocess, source=f"torchvision.models.{name}",
                     input_size=preprocess.crop if fixed else None, fixed_input=fixed, aliases={"DEFAULT": default})


# --- EfficientNet-Lite and the CIFAR ResNets (described without torch: extract.registry.builtin) ---------

for _spec in builtin.SPECS.values():
    _register(_spec)


# --- public API ---------------------------------------------------------------------------------

def list_models() -> list[str]:
    """The hand-registered models (every torchvision classification model and every timm model
    resolve too: see `model_names`)."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The entry for `name`: the registry, then any torchvision classification model, then
    ``timm/<arch>`` (built from timm); UserError with close matches for unknown names."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    key = name.lower().replace("-", "_")
    lowered = {k.lower(): k for k in _REGISTRY}
    if key in lowered:
        return _REGISTRY[lowered[key]]
    if is_timm(name):
        return timm_spec(name)
    tv = {n.lower(): n for n in torchvision_names()}
    if key in tv:
        return _tv_spec(tv[key])
    close = difflib.get_close_matches(name.lower(), list(_REGISTRY) + list(torchvision_names()), n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see --list-models"
    raise UserError(f"unknown model {name!r}{hint} (timm models are named timm/<arch>, e.g. timm/resnet50.a1_in1k)")


MAX_DESCRIBED = 100   # a pattern matching more lists names only (each description builds the network)


def model_names(pattern: str | None = None) -> list[str]:
    """The registry without a pattern; with a glob (``resnet*``, ``timm/convnext*``), every matching
    registry, torchvision and timm name (``timm/<arch>``), registry first."""
    if not pattern:
        return list(_REGISTRY)
    names = [n for n in [*_REGISTRY, *torchvision_names()] if fnmatch.fnmatchcase(n.lower(), pattern.lower())]
    if is_timm(pattern) or pattern.startswith(("*", "?", "[")):
        from extract.registry.timm_models import list_names
        try:
            names += [n for n in list_names(pattern) if fnmatch.fnmatchcase(n.lower(), pattern.lower())]
        except UserError:   # timm not installed
            pass
    return list(dict.fromkeys(names))


def _weights_on_disk(w: WeightSpec) -> bool:
    """Whether a weight's file is here now (torch.hub cache, or an importable package); no network."""
    if w.source == "package":
        import importlib.util
        found = importlib.util.find_spec(w.package) if w.package else None
        return bool(found and found.submodule_search_locations
                    and any(any((Path(d) / "models").glob("*.pth")) for d in found.submodule_search_locations))
    if w.source == "hf":
        files = w.hf_files or checkpoints.HF_FILES
        return w.hf_repo is not None and checkpoints.hf_cached(w.hf_repo, files) is not None
    if w.source == "unsupported":
        return False
    import urllib.parse
    name = w.filename or os.path.basename(urllib.parse.urlsplit(w.url or "").path)
    return bool(name) and (checkpoints.hub_checkpoint_dir() / name).is_file()


def describe_model(name: str) -> dict:
    """One model for ``--list-models``: widths measured on the meta device; downloads nothing.

    ``dim`` is the width of the default tap (``penultimate``), ``taps`` maps each tap to its width,
    ``weights_on_disk`` says whether the default weights are already here.
    """
    s = get_spec(name)
    w = s.weights.get(s.default_weights)
    dims = measure_dims(s, [PENULTIMATE, *s.taps])
    return {"name": s.name, "default_weights": s.default_weights, "weights": list(s.weights),
            "default_tap": PENULTIMATE, "dim": dims.pop(PENULTIMATE), "taps": dims,
            "weights_on_disk": bool(w and _weights_on_disk(w)),
            "input": (w.preprocess if w else s.preprocess).crop, "source": s.source}


def describe_models(pattern: str | None = None) -> list[dict]:
    """`describe_model` of each of `model_names(pattern)` (the registry without a pattern)."""
    return [describe_model(n) for n in model_names(pattern)]


def _get_module(net: nn.Module, path: str) -> nn.Module:
    try:
        return net.get_submodule(path)
    except AttributeError:
        raise UserError(f"no layer {path!r} in this network") from None


def _set_module(net: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(_get_module(net, parent) if parent else net, leaf, module)


def build_network(name: str, keep_head: bool = False, weight: "WeightSpec | None" = None) -> nn.Module:
    """The random-init architecture (the one `weight` fits, when given); its classifier replaced by
    nn.Identity unless `keep_head`.

    Build under ``with torch.device('meta'):`` to check shapes without allocating weights.
    """
    spec = get_spec(name)
    net = (weight.build if weight is not None and weight.build is not None else spec.build)()
    if not keep_head:
        _set_module(net, spec.head_path, nn.Identity())
    return net


def resolve_weights(model: "str | ModelRef", weights: str | None = "default", *,
                    download: bool = True) -> ResolvedWeights:
    """The one interpretation of a model name and a --weights value.

    `model` is an architecture (``resnet50``), ``arch.tag`` (``resnet50.swav``), ``arch=FILE``, or
    a parsed ModelRef; `weights` is ``default``, ``none``/None (random init), a registry tag, or a
    checkpoint file (``~`` expanded). Every spelling of the same choice gives the same ResolvedWeights.
    """
    ref = model if isinstance(model, ModelRef) else ModelRef.parse(model, weights, known=_REGISTRY)
    return resolve_for(get_spec(ref.arch), ref, download=download)


def load_backbone(name: str, weights: str | None = "default", layers: Sequence[str] | None = None,
                  *, download: bool = True, allow_missing: bool = False) -> Backbone:
    """Build `name` with `weights` (see `resolve_weights`), frozen, on CPU.

    `layers` defaults to ``["penultimate"]``; taps such as ``layer3`` or ``fc6`` or any dotted
    module path are pooled to (B, D). ``download=False`` never touches the network: a missing
    file is a UserError naming it and its folder. A checkpoint that leaves weights of the network
    missing is refused unless `allow_missing`.
    """
    return build_backbone(resolve_weights(name, weights, download=download), layers, allow_missing=allow_missing)


def build_backbone(resolved: ResolvedWeights, layers: Sequence[str] | None = None, *,
                   allow_missing: bool = False) -> Backbone:
    """The frozen Backbone of weights already resolved (nothing is resolved or hashed twice)."""
    layers = list(layers) if layers else [PENULTIMATE]
    net = build_network(resolved.spec.name, weight=resolved.weight)
    report = {"missing": [], "unexpected": [], "dropped": [], "ignored": 0, "prefix": None}
    sha = resolved.sha256
    if resolved.file is not None:
        report = checkpoints.load_into(net, _read_for(resolved, net), head_prefixes=_head_prefixes(resolved.spec),
                                       source=resolved.file.name, allow_missing=allow_missing)
    return Backbone(resolved.spec, net, layers, weights=resolved.tag,
                    weights_file=str(resolved.file) if resolved.file else None, weights_sha256=sha,
                    preprocess=resolved.preprocess, load_report=report)


def _head_prefixes(spec: ModelSpec) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*checkpoints.HEAD_PREFIXES, spec.head_path + ".")))


def _read_for(resolved: ResolvedWeights, net: nn.Module):
    """The checkpoint of `resolved`, in the source's own key layout where it has a conversion (timm)."""
    obj = checkpoints.read_checkpoint(resolved.file)
    return resolved.spec.adapt_state(obj, net) if resolved.spec.adapt_state is not None else obj


def load_classifier(name: str, weights: str | None = "default", *, download: bool = True) -> nn.Module:
    """The full network with its own classifier restored from the checkpoint (eval mode).

    Useful to check that a checkpoint really loaded: its predictions should be right.
    """
    resolved = resolve_weights(name, weights, download=download)
    spec = resolved.spec
    net = build_network(spec.name, keep_head=True, weight=resolved.weight)
    if resolved.file is not None:
        resolved.sha256   # a registry file that is not the published one is refused before it is read
        checkpoints.load_into(net, _read_for(resolved, net), head_prefixes=(), source=resolved.file.name)
    if spec.embed is not None and spec.family != "timm":   # e.g. EfficientNet-Lite: avoid the package's forward
        head = _get_module(net, spec.head_path)
        return _WithHead(net, spec.embed, head).eval()
    return net.eval()


class _WithHead(nn.Module):
    def __init__(self, net, embed, head):
        super().__init__()
        self.net, self._embed, self.head = net, embed, head

    def forward(self, x):
        return self.head(self._embed(self.net, x))


def expand_taps(spec: ModelSpec, layers: Sequence[str] | None) -> list[str] | None:
    """`tap_names`, with every name that is neither a tap nor 'all' checked as a module path on a
    meta-device copy of the network (UserError with close matches), so a bad one is reported before
    any work starts."""
    out = tap_names(spec, layers)
    other = [t for t in out or () if t != PENULTIMATE and t not in spec.taps]
    if other:
        measure_dims(spec, other)
    return out


__all__ = ["Backbone", "ModelSpec", "WeightSpec", "PENULTIMATE", "build_network", "describe_models", "get_spec",
           "list_models", "model_names", "describe_model", "torchvision_names", "measure_dims", "load_backbone",
           "build_backbone", "expand_taps", "ALL_TAPS", "load_classifier", "resolve_weights", "ResolvedWeights"]

