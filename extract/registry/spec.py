"""What a registry entry is: an architecture (ModelSpec) and the weights it can load (WeightSpec).

Describing an entry imports no torch (its builders import it when they run).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

from extract.core.errors import UserError
from extract.store.identity import PENULTIMATE
from extract.store.preprocess import Preprocess

if TYPE_CHECKING:
    import torch
    from torch import nn

ALL_TAPS = "all"


@dataclass(frozen=True)
class WeightSpec:
    """One set of weights for an architecture."""

    tag: str
    source: str                     # "torchvision" | "url" | "package" | "hf" | "unsupported" (note says why)
    preprocess: Preprocess
    url: str | None = None
    filename: str | None = None     # name in the torch.hub cache (default: the URL's basename)
    package: str | None = None      # importable module holding the file (source "package")
    pip_name: str | None = None
    sha256: str | None = None
    note: str = ""
    hf_repo: str | None = None      # Hugging Face hub repo (source "hf"), read from the hub's own cache
    hf_files: tuple[str, ...] = ()  # file names tried in that repo, in order
    build: Callable[[], nn.Module] | None = None   # the network these weights fit, when not the spec's
    num_classes: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """An architecture in the registry."""

    name: str
    family: str
    build: Callable[[], nn.Module]          # random-init network with its classifier
    head_path: str                          # dotted path of the classifier
    taps: dict[str, str]                    # tap alias -> module path (widths: backbone.measure_dims)
    weights: dict[str, WeightSpec]
    default_weights: str
    preprocess: Preprocess                  # for random init and local checkpoint files
    source: str
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None
    input_size: int | None = None           # fixed input resolution, if the network needs one
    aliases: dict[str, str] = field(default_factory=dict)   # extra weight names -> tag
    reader: Callable | None = None          # (net, layers) -> module returning pooled taps (timm); else torch.fx
    default_taps: tuple[str, ...] | None = None   # what --layer all takes (default: every tap)
    adapt_state: Callable | None = None     # (checkpoint, net) -> checkpoint: a source's own key conversion
    fixed_input: bool = False               # the network runs at input_size only (a ViT's position embedding)

    def weight(self, tag: str) -> WeightSpec:
        key = self.aliases.get(tag.upper(), self.aliases.get(tag.lower(), tag))
        for t, w in self.weights.items():
            if t.lower() == key.lower():
                return w
        close = difflib.get_close_matches(tag, list(self.weights) + list(self.aliases), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown weights {tag!r} for {self.name} (available: {', '.join(self.weights)}, "
                        f"'none', or a checkpoint file path){hint}")


def tap_names(spec: ModelSpec, layers: Sequence[str] | None) -> list[str] | None:
    """`layers` with 'all' replaced by the model's default tap (penultimate), then every registry tap
    in depth order (a timm transformer's blocks with the pooling of its own head); penultimate stays
    first so it remains the file's default layer. None stays None. Other names are kept as given
    (`extract.registry.models.expand_taps` checks them as module paths)."""
    if not layers:
        return None
    out: list[str] = []
    every = spec.taps if spec.default_taps is None else spec.default_taps
    for layer in layers:
        out += [PENULTIMATE, *every] if layer.lower() == ALL_TAPS else [layer]
    return list(dict.fromkeys(out))
