"""timm backbones, named as on the Hugging Face hub: ``timm/<arch>`` and ``timm/<arch>.<tag>``.

Nothing is registered by hand: :func:`timm_spec` builds a :class:`~extract.registry.spec.ModelSpec`
from timm itself the first time a name is asked for (one build on the meta device, no weights):

- weights: every pretrained tag timm knows for the architecture (``get_arch_pretrained_cfgs``),
  the default being timm's own default tag; each is a file of its hub repo (``hf_hub_id``, read
  from the Hugging Face cache, downloaded there once) or, for the few without one, a URL in
  torch.hub's cache. Each tag builds its own network (its class count and input size).
- preprocessing: ``timm.data.resolve_data_config`` of the tag (input size, crop_pct, crop_mode,
  interpolation, mean, std) as a :class:`Preprocess` with resize = floor(size / crop_pct), as
  ``timm.data.create_transform`` computes it.
- taps: ``penultimate`` is the pre-logits embedding (``forward_head(forward_features(x),
  pre_logits=True)``); intermediate taps are the ``feature_info`` modules read in one pass by
  ``forward_intermediates`` (stopping after the last one asked for). CNN feature maps are global
  average pooled. Transformer blocks (networks whose ``forward_intermediates`` returns prefix
  tokens) are pooled explicitly, and the pooling is part of the tap's name: ``blocks.5:cls`` (the
  class token) or ``blocks.5:mean`` (mean of the patch tokens, register and class tokens left
  out). ``--layer all`` takes the pooling the network's own head uses (``cls`` for
  ``global_pool='token'``, else ``mean``).
- a local checkpoint (``--weights FILE``, .safetensors or a .pth state dict) is read weights-only;
  when its keys do not fit the network as they are, the architecture's own timm
  ``checkpoint_filter_fn`` (original DINOv2, CLIP, ... layouts) is tried.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
import math
import os
import sys
import urllib.parse
from typing import Mapping, Sequence

import torch
from torch import nn

from extract.core.errors import UserError
from extract.registry import checkpoints
from extract.registry.backbone import PENULTIMATE
from extract.registry.checkpoints import HF_FILES
from extract.registry.spec import ModelSpec, WeightSpec
from extract.store.preprocess import Preprocess

PREFIX = "timm/"
POOLINGS = ("cls", "mean")
_INTERPOLATIONS = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


def is_timm(name: str) -> bool:
    return name.lower().startswith(PREFIX)


def _timm():
    try:
        import timm
    except ImportError:
        raise UserError("timm models need the timm package: pip install timm") from None
    return timm


# --- preprocessing ----------------------------------------------------------------------------------

def preprocess_of(cfg) -> Preprocess:
    """timm's eval transform of one pretrained config as this project's Preprocess."""
    from timm.data import resolve_data_config

    data = resolve_data_config(pretrained_cfg=cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    _, h, w = data["input_size"]
    if h != w:
        raise UserError(f"timm/{cfg.architecture}.{cfg.tag} takes {h}x{w} inputs: only square inputs are supported")
    crop_pct = data.get("crop_pct") or 0.875
    mode = data.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise UserError(f"timm/{cfg.architecture}.{cfg.tag} evaluates with crop_mode {mode!r}, which featprobe "
                        "does not reproduce (center and squash only)")
    mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
    if len(mean) == 1:
        mean, std = mean * 3, std * 3
    return Preprocess(resize=math.floor(h / crop_pct), crop=int(h),
                      interpolation=_INTERPOLATIONS.get(data.get("interpolation"), "bilinear"),
                      mean=mean, std=std, crop_mode=mode)


# --- taps ---------------------------------------------------------------------------------------------

def _pool(t, how: str) -> torch.Tensor:
    """One intermediate of forward_intermediates (NCHW, or (NCHW patch tokens, prefix tokens)) -> (B, D)."""
    if how == "cls":
        return t[1][:, 0]
    spatial = t[0] if isinstance(t, (tuple, list)) else t
    return spatial.mean((2, 3)) if spatial.dim() == 4 else spatial.flatten(1)


class TimmTaps(nn.Module):
    """The pooled taps of a timm network from one (partial) forward: ``forward_intermediates``.

    Only the penultimate embedding: ``forward_head(forward_features(x), pre_logits=True)``. Only
    intermediate taps: ``forward_intermediates(..., intermediates_only=True, stop_early=True)``, which
    stops after the deepest tap. Both: one ``forward_intermediates`` whose final features feed
    ``forward_head(pre_logits=True)``. A plain module (no torch.fx): it converts for OpenVINO by tracing.
    """

    traced = False

    def __init__(self, net: nn.Module, layers: Sequence[str], *, info: "ArchInfo"):
        super().__init__()
        object.__setattr__(self, "net", net)   # not a submodule: the Backbone owns the network
        self.layers = list(dict.fromkeys(layers))
        unknown = [layer for layer in self.layers if layer != PENULTIMATE and layer not in info.taps]
        if unknown:
            raise UserError(info.unknown_tap(unknown[0]))
        self.plan = {layer: info.taps[layer] for layer in self.layers if layer != PENULTIMATE}
        self.indices = sorted({i for i, _ in self.plan.values()})
        self.penultimate = PENULTIMATE in self.layers
        params = info.fi_params
        self.kwargs = {"indices": self.indices}
        if "norm" in params:
            self.kwargs["norm"] = False
        if "output_fmt" in params:
            self.kwargs["output_fmt"] = "NCHW"
        if any(how == "cls" for _, how in self.plan.values()):
            self.kwargs["return_prefix_tokens"] = True
        self.stop_early = "stop_early" in params

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        net, out = self.net, {}
        if not self.indices:
            return {PENULTIMATE: net.forward_head(net.forward_features(x), pre_logits=True)}
        if self.penultimate:
            final, inter = net.forward_intermediates(x, intermediates_only=False, **self.kwargs)
            out[PENULTIMATE] = net.forward_head(final, pre_logits=True)
        else:
            early = {"stop_early": True} if self.stop_early else {}
            inter = net.forward_intermediates(x, intermediates_only=True, **early, **self.kwargs)
        if len(inter) != len(self.indices):
            raise UserError(f"timm's forward_intermediates of {type(net).__name__} returned {len(inter)} "
                            f"feature maps for {len(self.indices)} taps; use the penultimate tap")
        for layer, (i, how) in self.plan.items():
            out[layer] = _pool(inter[self.indices.index(i)], how)
        return {layer: out[layer] for layer in self.layers}

    def tuple_module(self) -> nn.Module:
        return _TupleTaps(self)


class _TupleTaps(nn.Module):
    """For converters (OpenVINO): the taps as a tuple of float32 tensors in layer order."""

    def __init__(self, taps: TimmTaps):
        super().__init__()
        self.taps = taps
        self.net = taps.net   # registered here, so tracing sees the parameters

    def forward(self, x):
        out = self.taps(x)
        return tuple(out[layer].float() for layer in self.taps.layers)


# --- the architecture -----------------------------------------------------------------------------

class ArchInfo:
    """What a meta-device build of a timm architecture says about it (no weights, no arithmetic)."""

    def __init__(self, arch: str, net: nn.Module):
        self.arch = arch
        self.cls_name = type(net).__name__
        self.module = type(net).__module__
        fi = getattr(net, "forward_intermediates", None)
        self.fi_params = set(inspect.signature(fi).parameters) if fi is not None else set()
        self.has_intermediates = fi is not None
        self.tokens = "return_prefix_tokens" in self.fi_params
        prefix = int(getattr(net, "num_prefix_tokens", 0) or 0)
        self.has_cls = self.tokens and prefix > 0 and getattr(net, "cls_token", None) is not None
        self.dynamic = hasattr(net, "dynamic_img_size")
        head = net.get_classifier() if hasattr(net, "get_classifier") else None
        head = head[0] if isinstance(head, (tuple, list)) else head
        names = {id(m): n for n, m in net.named_modules()}
        cfg_head = (net.pretrained_cfg or {}).get("classifier") or "fc"
        cfg_head = cfg_head[0] if isinstance(cfg_head, (tuple, list)) else cfg_head
        self.head_path = names.get(id(head)) or cfg_head
        gp = getattr(net, "global_pool", None)
        self.default_pool = "cls" if self.has_cls and gp == "token" else "mean"
        feature_info = getattr(net, "feature_info", None) or []
        modules = [f.get("module") for f in feature_info if isinstance(f, Mapping)] if self.has_intermediates else []
        self.taps: dict[str, tuple[int, str]] = {}      # tap name -> (forward_intermediates index, pooling)
        self.paths: dict[str, str] = {}                # tap name -> module path
        self.default_taps: list[str] = []              # what --layer all takes
        for i, module in enumerate(modules):
            if not module:
                continue
            if self.tokens:
                for how in POOLINGS:
                    if how == "cls" and not self.has_cls:
                        continue
                    name = f"{module}:{how}"
                    self.taps[name], self.paths[name] = (i, how), module
                    if how == self.default_pool:
                        self.default_taps.append(name)
            else:
                self.taps[module], self.paths[module] = (i, "avg"), module
                self.default_taps.append(module)

    def unknown_tap(self, layer: str) -> str:
        if self.tokens and layer in self.paths.values():
            ways = " or ".join(f"{layer}:{how}" for how in POOLINGS if how != "cls" or self.has_cls)
            return (f"layer {layer!r} of timm/{self.arch} is a transformer block: say how its tokens are pooled, "
                    f"{ways}")
        close = difflib.get_close_matches(layer, list(self.taps), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        shown = ", ".join(list(self.taps)[:6]) + (" ..." if len(self.taps) > 6 else "")
        return (f"unknown layer {layer!r} for timm/{self.arch} (taps: {PENULTIMATE}"
                f"{', ' + shown if shown else ''}){hint}")


def _create(name: str, **kwargs) -> nn.Module:
    return _timm().create_model(name, pretrained=False, **kwargs)


@functools.lru_cache(maxsize=None)
def arch_info(arch: str) -> ArchInfo:
    with torch.device("meta"):
        net = _create(arch)
    return ArchInfo(arch, net)


def canonical_arch(name: str) -> str:
    """``timm/ConvNeXt_Tiny`` -> ``convnext_tiny``; UserError with close matches for unknown names."""
    timm = _timm()
    arch = name[len(PREFIX):] if is_timm(name) else name
    for candidate in (arch, arch.lower(), arch.lower().replace("-", "_")):
        if timm.is_model(candidate):
            return candidate
    known = timm.list_models()
    close = difflib.get_close_matches(arch.lower(), known, n=3, cutoff=0.6)
    hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else \
        f"; list them with --list-models '{PREFIX}{arch.split('_')[0]}*'"
    raise UserError(f"unknown timm model {name!r}{hint}")


def _builder(arch: str, tag: str | None, dynamic: bool):
    name = f"{arch}.{tag}" if tag else arch
    kwargs = {"dynamic_img_size": True} if dynamic else {}

    def build() -> nn.Module:
        return _create(name, **kwargs)
    return build


def _hub_filenames(cfg) -> tuple[str, ...]:

    return (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILES


def _weight(arch: str, cfg, dynamic: bool):

    tag = cfg.tag
    try:
        pre, problem = preprocess_of(cfg), ""
    except UserError as e:
        pre, problem = Preprocess(), str(e)
    common = dict(preprocess=pre, build=_builder(arch, tag, dynamic), num_classes=cfg.num_classes,
                  note=f"timm pretrained_cfg {arch}.{tag}")
    if problem:
        return WeightSpec(tag, "unsupported", note=problem, **{k: v for k, v in common.items() if k != "note"})
    if cfg.hf_hub_id:
        return WeightSpec(tag, "hf", hf_repo=cfg.hf_hub_id, hf_files=_hub_filenames(cfg), **common)
    if cfg.url and not cfg.custom_load:
        name = os.path.basename(urllib.parse.urlsplit(cfg.url).path)
        return WeightSpec(tag, "url", url=cfg.url, filename=f"timm_{name}", **common)
    rest = {k: v for k, v in common.items() if k != "note"}
    if not (cfg.url or cfg.file):
        return WeightSpec(tag, "unsupported", note=f"timm/{arch}.{tag} has no published weights: use --weights none "
                          "or --weights FILE", **rest)
    return WeightSpec(tag, "unsupported", note=f"timm/{arch}.{tag} has no hub file featprobe can read "
                      f"(timm loads {cfg.url or cfg.file} with code of its own): use --weights FILE", **rest)


def _adapt_state(module_name: str):
    """Try the architecture's own timm checkpoint_filter_fn when a file's keys do not fit as they are."""

    def adapt(obj, net: nn.Module):

        filt = getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)
        if filt is None or not isinstance(obj, Mapping):
            return obj
        _, report = checkpoints.fit_state_dict(obj, net)
        if not report["missing"]:
            return obj
        flat = obj
        for key in ("state_dict", "model"):
            if isinstance(flat.get(key), Mapping):
                flat = flat[key]
        if not all(isinstance(v, torch.Tensor) for v in flat.values()):
            return obj
        try:
            try:
                filtered = filt(dict(flat), net)
            except TypeError:
                filtered = filt(dict(flat))
            _, after = checkpoints.fit_state_dict(filtered, net)
        except Exception:  # noqa: BLE001 - a filter that does not apply: the file as it is
            return obj
        return filtered if len(after["missing"]) < len(report["missing"]) else obj
    return adapt


@functools.lru_cache(maxsize=None)
def timm_spec(name: str):
    """The ModelSpec of ``timm/<arch>`` built from timm (cached per process)."""

    timm = _timm()
    arch = canonical_arch(name)
    info = arch_info(arch)
    cfgs = timm.models.get_arch_pretrained_cfgs(arch)
    weights = {cfg.tag: _weight(arch, cfg, info.dynamic) for cfg in cfgs.values() if cfg.tag}
    default_cfg = timm.models.get_pretrained_cfg(arch)
    default = default_cfg.tag if default_cfg is not None and default_cfg.tag in weights else None
    if default is not None and weights[default].source != "unsupported":
        preprocess = weights[default].preprocess
    else:
        preprocess = preprocess_of(default_cfg) if default_cfg is not None else Preprocess(256, 224, "bicubic")
    fixed = default_cfg is not None and default_cfg.fixed_input_size and not info.dynamic
    return ModelSpec(
        name=PREFIX + arch, family="timm", build=_builder(arch, default, info.dynamic), head_path=info.head_path,
        taps=dict(info.paths), weights=weights, default_weights=default or "none", preprocess=preprocess,
        source=f"timm {timm.__version__} {info.cls_name}", embed=_prelogits,
        input_size=preprocess.crop if fixed else None, fixed_input=fixed,
        aliases={"DEFAULT": default} if default else {},
        reader=functools.partial(TimmTaps, info=info), default_taps=tuple(info.default_taps),
        adapt_state=_adapt_state(info.module))


def _prelogits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_head(net.forward_features(x), pre_logits=True)


def list_names(pattern: str) -> list[str]:
    """``timm/<arch>`` names matching a glob on the full name (``timm/convnext*``), sorted."""
    pattern = pattern[len(PREFIX):] if is_timm(pattern) else pattern
    return [PREFIX + n for n in _timm().list_models(pattern)]


def matches(pattern: str, name: str) -> bool:
    return fnmatch.fnmatchcase(name.lower(), pattern.lower())
