"""The classifier to train: a backbone's network with a new linear layer, what to freeze, and param groups."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from extract.core.errors import UserError

FREEZE_HELP = "none | backbone | until:<layer>"


class Classifier(nn.Module):
    """A backbone's network with a new linear classifier where its own was.

    `embed` (the registry's embedding function, when the network's own forward is not
    used, e.g. EfficientNet-Lite) maps (net, x) to pooled features that feed the head.
    `reset`: the network's own ``reset_classifier(n_classes)`` makes the new layer (timm), and its
    own forward runs; `head_path` is then found from ``get_classifier()``.
    """

    def __init__(self, net: nn.Module, head_path: str, in_features: int, n_classes: int, embed=None,
                 reset: bool = False):
        super().__init__()
        self.net = net
        self._embed = embed
        if reset:
            net.reset_classifier(n_classes)
            head = net.get_classifier()
            head = head[0] if isinstance(head, (tuple, list)) else head
            head_path = next(name for name, m in net.named_modules() if m is head)
            self._embed = None
        else:
            parent_path, _, attr = head_path.rpartition(".")
            parent = net.get_submodule(parent_path) if parent_path else net
            setattr(parent, attr, nn.Linear(in_features, n_classes))
        self.head_path = "net." + head_path   # inside this module

    @property
    def head(self) -> nn.Linear:
        return self.get_submodule(self.head_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._embed is None:
            return self.net(x)
        return self.head(self._embed(self.net, x))


def parse_freeze(spec: str) -> tuple[str, str | None]:
    """'none' | 'backbone' | 'until:<layer>' -> (mode, layer)."""
    mode, sep, layer = spec.partition(":")
    if mode in ("none", "backbone") and not sep:
        return mode, None
    if mode == "until" and layer:
        return mode, layer
    raise UserError(f"bad --freeze {spec!r}: expected {FREEZE_HELP}")


def trainable_start(model: Classifier, spec: str, resolve: Callable[[str], nn.Module]) -> str | None:
    """Dotted name of the first trainable module (registration order), or None when all train.

    until:<layer> starts at the layer's module; a tap on a parameter-free module (VGG's fc6
    is the ReLU after its Linear) starts at the nearest module with parameters before it.
    """
    mode, layer = parse_freeze(spec)
    if mode == "none":
        return None
    if mode == "backbone" or layer == "penultimate":
        return model.head_path
    try:
        target = resolve(layer)
    except UserError as e:
        raise UserError(f"bad --freeze {spec!r}: {e}") from None
    modules = list(model.named_modules())
    pos = next((i for i, (_, m) in enumerate(modules) if m is target), None)
    if pos is None:
        raise UserError(f"bad --freeze {spec!r}: layer {layer!r} is not part of the network")
    if any(True for _ in target.parameters()):
        return modules[pos][0]
    for name, m in reversed(modules[:pos]):
        if any(True for _ in m.parameters(recurse=False)):
            return name
    return None


def _lineage(path: str) -> set[str]:
    """A dotted path and all its ancestors, including the root ''."""
    return {path.rsplit(".", i)[0] for i in range(path.count(".") + 1)} | {""}


def frozen_modules(model: Classifier, start: str | None) -> set[str]:
    """Names of the modules to freeze: those registered before `start` (all but the head when
    `start` is the head), never the head or an ancestor of `start` or of the head.

    Registration order follows the forward order in torchvision-style networks, so
    "from <layer> onward" is everything registered at or after that module.
    """
    if start is None:
        return set()
    names = [n for n, _ in model.named_modules()]
    pos = len(names) if start == model.head_path else names.index(start)
    keep = _lineage(start) | _lineage(model.head_path)
    return {n for n in names[:pos] if n not in keep}


def apply_freeze(model: Classifier, spec: str, resolve: Callable[[str], nn.Module]) -> set[str]:
    """Apply a --freeze spec: requires_grad False on frozen modules' parameters, True elsewhere.

    Returns the frozen module names (for `set_train_mode`).
    """
    frozen = frozen_modules(model, trainable_start(model, spec, resolve))
    model.requires_grad_(True)
    for name, m in model.named_modules():
        if name in frozen:
            for p in m.parameters(recurse=False):
                p.requires_grad_(False)
    return frozen


def set_train_mode(model: nn.Module, frozen: set[str]) -> None:
    """model.train(), but frozen modules stay in eval: running stats never move, and dropout or
    stochastic depth never perturbs what a fixed feature extractor computes."""
    model.train()
    for name, m in model.named_modules():
        if name in frozen:
            m.eval()


def param_groups(model: Classifier, *, lr: float, weight_decay: float,
                 head_lr_mult: float = 1.0) -> list[dict]:
    """Trainable parameters split into backbone/head x decay/no-decay groups.

    Biases and 1-D (normalisation) parameters get no weight decay; the head's groups
    use lr * head_lr_mult. Empty groups are left out.
    """
    buckets: dict[tuple[str, bool], list] = {}
    head = {id(p) for p in model.head.parameters()}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        part = "head" if id(p) in head else "backbone"
        buckets.setdefault((part, p.ndim > 1), []).append(p)
    groups = []
    for part in ("backbone", "head"):
        for decay in (True, False):
            params = buckets.get((part, decay))
            if params:
                groups.append({"name": f"{part}{'' if decay else '-no-decay'}", "params": params,
                               "lr": lr * (head_lr_mult if part == "head" else 1.0),
                               "weight_decay": weight_decay if decay else 0.0})
    return groups


def make_optimizer(groups: list[dict], name: str, *, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """SGD with (Nesterov-free) momentum or AdamW over prepared param groups."""
    if not groups:
        raise UserError("nothing to train: every parameter is frozen")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise UserError(f"unknown optimizer {name!r}; choose sgd or adamw")
