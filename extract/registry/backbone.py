"""A frozen network that returns pooled features for several taps from one (partial) forward.

The taps are read through torchvision's ``create_feature_extractor``: the network is traced by
torch.fx, the graph ends at the last requested tap and everything after it is dropped, so asking
for ``layer1`` does not run ``layer2``..``fc``. Each tap is global-average pooled right where it is
computed (a node inserted after it in the graph), so a later in-place op cannot change it and the
full activation map can be freed early. A network torch.fx cannot trace falls back to forward hooks
(see :class:`_HookTaps`).

Tap widths are measured, never typed: :func:`measure_dims` runs one forward of a copy built on the
``meta`` device (shapes only: no weights allocated, no arithmetic) and remembers the answer per
(model, taps) for the process.
"""

from __future__ import annotations

import difflib
import re
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from extract.core.errors import UserError

if TYPE_CHECKING:
    from extract.registry.spec import ModelSpec
    from extract.store.preprocess import Preprocess

PENULTIMATE = "penultimate"
_OUT = "out"   # the Identity that marks the penultimate embedding inside _Embedder


def pool(y: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) by global average pooling; other shapes -> (B, prod(rest))."""
    if y.dim() == 4:
        y = F.adaptive_avg_pool2d(y, 1)
    return y.flatten(1)


def _width(shape: torch.Size) -> int:
    if len(shape) == 4:
        return int(shape[1])
    n = 1
    for d in shape[1:]:
        n *= int(d)
    return n


class _Embedder(nn.Module):
    """The network with the penultimate embedding as its output, marked by the Identity ``out``.

    The embedding is ``embed(net, x)`` where the registry gives one (EfficientNet-Lite:
    ``extract_features`` + global average pool), else ``net(x)`` with the classifier already
    replaced by nn.Identity. Tap module paths become ``net.<path>`` in the traced graph.
    """

    def __init__(self, net: nn.Module, embed: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None):
        super().__init__()
        self.net = net
        self.embed = embed   # a plain function, not a submodule
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.embed(self.net, x) if self.embed is not None else self.net(x))


def tap_path(spec: "ModelSpec", tap: str) -> str:
    """The module path behind a tap alias (``fc6`` -> ``classifier.1``); other names are paths already."""
    return spec.taps.get(tap, tap)


def find_module(spec: "ModelSpec", net: nn.Module, tap_or_path: str) -> nn.Module:
    """The module behind a tap alias or dotted path; UserError with close matches if there is none."""
    if tap_or_path == PENULTIMATE:
        return net
    try:
        return net.get_submodule(tap_path(spec, tap_or_path))
    except AttributeError:
        close = difflib.get_close_matches(tap_or_path, list(spec.taps), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UserError(f"unknown layer {tap_or_path!r} for {spec.name} (taps: {PENULTIMATE}, "
                        f"{', '.join(spec.taps)}, or a module path){hint}") from None


# --- widths ---------------------------------------------------------------------------------------

_DIMS: dict[tuple[str, tuple[str, ...]], dict[str, int]] = {}


@contextmanager
def parameters_on_meta():
    """Every parameter and buffer a module registers goes to the meta device, while the constructor's
    own arithmetic runs on the CPU (torchvision's RegNet computes its stage widths from tensor
    values, which meta tensors do not have). Weights are never allocated for longer than one layer."""
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer

    def parameter(module, name, param):
        register_parameter(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    def buffer(module, name, tensor, persistent=True):
        register_buffer(module, name, tensor if tensor is None else tensor.to("meta"), persistent)

    nn.Module.register_parameter, nn.Module.register_buffer = parameter, buffer
    try:
        yield
    finally:
        nn.Module.register_parameter, nn.Module.register_buffer = register_parameter, register_buffer


def build_on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with its weights on the meta device (shapes only: no memory, no arithmetic)."""
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:
        with parameters_on_meta():
            return build()


def _meta_network(spec: "ModelSpec") -> nn.Module:
    """The random-init architecture on the meta device, classifier replaced by nn.Identity."""
    return _headless(spec, build_on_meta(spec.build))


def _headless(spec: "ModelSpec", net: nn.Module) -> nn.Module:
    parent, _, leaf = spec.head_path.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, leaf, nn.Identity())
    return net.eval()


def measure_dims(spec: "ModelSpec", layers: Sequence[str]) -> dict[str, int]:
    """Width of each tap after pooling, ``{layer: D}`` in the order given.

    Measured by one forward of a meta-device copy of the network (no weights allocated, no
    arithmetic, no download) with a forward hook on each tap; cached per (model, taps).
    """
    layers = tuple(dict.fromkeys(layers))
    key = (spec.name, layers)
    if key not in _DIMS:
        shapes_of = _reader_shapes if spec.reader is not None else _shapes
        try:
            shapes = shapes_of(spec, _meta_network(spec), layers)
        except UserError:
            raise
        except Exception:
            # A forward that reads tensor values (``if x.mean() > 0``) cannot run on meta tensors:
            # one forward of a random-init CPU copy on a zero image instead.
            shapes = shapes_of(spec, _headless(spec, spec.build()), layers)
        _DIMS[key] = {layer: _width(shapes[layer]) for layer in layers}
    return dict(_DIMS[key])


def _reader_shapes(spec: "ModelSpec", net: nn.Module, layers: Sequence[str]) -> dict[str, torch.Size]:
    """Shapes of the pooled taps of a network read by its spec's own tap reader (timm)."""
    size = spec.input_size or spec.preprocess.crop
    device = next(net.parameters(), torch.empty(0)).device
    with torch.no_grad():
        out = spec.reader(net, layers)(torch.zeros(1, 3, size, size, device=device))
    return {layer: out[layer].shape for layer in layers}


def _shapes(spec: "ModelSpec", net: nn.Module, layers: Sequence[str]) -> dict[str, torch.Size]:
    """Output shape of each tap for one image, read by forward hooks."""
    wrapper = _Embedder(net, spec.embed)
    shapes: dict[str, torch.Size] = {}

    def saver(layer):
        def hook(module, inputs, output):
            if not isinstance(output, torch.Tensor):
                raise UserError(f"layer {layer!r} of {spec.name} returns {type(output).__name__}, not a tensor")
            shapes[layer] = output.shape
        return hook

    handles = [wrapper.out.register_forward_hook(saver(PENULTIMATE))]
    handles += [find_module(spec, net, layer).register_forward_hook(saver(layer))
                for layer in layers if layer != PENULTIMATE]
    size = spec.input_size or spec.preprocess.crop
    device = next(net.parameters(), torch.empty(0)).device
    try:
        with torch.no_grad():
            wrapper(torch.zeros(1, 3, size, size, device=device))
    finally:
        for h in handles:
            h.remove()
    unused = [layer for layer in layers if layer not in shapes]
    if unused:
        raise UserError(f"layer {unused[0]!r} of {spec.name} is not run by the network's forward")
    return shapes


# --- the two ways of reading taps -----------------------------------------------------------------

def _last_node(names: Sequence[str], query: str, modules: set[str]) -> str | None:
    """The traced node whose output is the output of module `query` (its last node in execution order).

    torchvision names nodes by module path: ops inside ``layer1`` are ``layer1.0.conv1``,
    ``layer1.0.add`` ...; a leaf module called again gets ``_1``, ``_2`` (``layer1.0.relu_2``). Like
    a forward hook, the last call wins. Resolving to exact node names here (rather than passing
    module paths to create_feature_extractor) keeps two taps that end on the same node, e.g.
    ``layer4`` and ``layer4.1``, both right: it returns each node once.
    """
    again = re.compile(rf"{re.escape(query)}_\d+")
    found = None
    for n in names:
        if n == query or n.startswith(query + ".") or (again.fullmatch(n) and n not in modules):
            found = n
    return found


def _trace(wrapper: _Embedder, nodes: Sequence[str]) -> nn.Module:
    from torchvision.models.feature_extraction import create_feature_extractor

    with warnings.catch_warnings():   # train/eval graph differences: only the eval graph is used
        warnings.simplefilter("ignore")
        return create_feature_extractor(wrapper.eval(), return_nodes={n: n for n in nodes},
                                        suppress_diff_warning=True)


def _pool_where_computed(gm) -> None:
    """Pool every returned node right after it is computed (the eval graph, which is the one used)."""
    graph = gm.graph
    output = next(n for n in graph.nodes if n.op == "output")
    pooled = {}
    for name, node in output.args[0].items():
        with graph.inserting_after(node):
            pooled[name] = graph.call_function(pool, (node,))
    output.args = (pooled,)
    graph.lint()
    gm.recompile()


class _FxTaps(nn.Module):
    """Taps read from a torch.fx graph that ends at the last of them (torchvision feature extraction)."""

    traced = True

    def __init__(self, wrapper: _Embedder, paths: dict[str, str]):
        super().__init__()
        from torchvision.models.feature_extraction import get_graph_node_names

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, names = get_graph_node_names(wrapper.eval(), suppress_diff_warning=True)   # eval graph
        modules = {n for n, _ in wrapper.named_modules()}
        self.node_of = {}
        for layer, path in paths.items():
            query = _OUT if layer == PENULTIMATE else f"net.{path}"
            node = _last_node(names, query, modules)
            if node is None:
                raise UserError(f"layer {layer!r} is not run by the network's forward")
            self.node_of[layer] = node
        self.graph_module = _trace(wrapper, list(dict.fromkeys(self.node_of.values())))
        _pool_where_computed(self.graph_module)

    def train(self, mode: bool = True):
        # The return nodes were resolved on the eval trace: the extractor always runs its eval graph
        # (BatchNorm/Dropout modules still follow their own .training, as the network's do).
        super().train(mode)
        self.graph_module.eval()
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.graph_module(x)
        return {layer: out[node] for layer, node in self.node_of.items()}


class _TupleTaps(nn.Module):
    """The traced tap graph with a tuple of pooled float32 outputs (see `Backbone.tuple_module`)."""

    def __init__(self, graph_module: nn.Module, nodes: list[str]):
        super().__init__()
        self.graph_module, self.nodes = graph_module, nodes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.graph_module(x)
        return tuple(out[n].float() for n in self.nodes)


class _Stop(Exception):
    """Raised by the last hook when every requested tap is read: the rest of the network is skipped."""


class _HookTaps(nn.Module):
    """Fallback for networks torch.fx cannot trace (data-dependent control flow, Python-side shape
    arithmetic, custom autograd Functions, ...): forward hooks on the tap modules.

    The hooks are attached only while the Backbone runs (``.net`` stays a plain network for
    fine-tuning). Each pools its activation at once; a module called more than once keeps its
    last call, as before. When the penultimate embedding is not asked for and the first forward
    showed every tap module runs once, the hook that completes the set stops the forward with an
    exception, so early taps do not run the rest of the network.
    """

    traced = False

    def __init__(self, wrapper: _Embedder, paths: dict[str, str]):
        super().__init__()
        self.wrapper = wrapper
        self.layers = list(paths)
        self._modules_of = {layer: wrapper.net.get_submodule(path) for layer, path in paths.items()
                            if layer != PENULTIMATE}
        self._store: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._stop_early: bool | None = None if PENULTIMATE not in paths else False   # None: not known yet

    def _saver(self, layer: str):
        def hook(module, inputs, output):
            self._store[layer] = pool(output)
            self._calls[layer] = self._calls.get(layer, 0) + 1
            if self._stop_early and len(self._store) == len(self._modules_of):
                raise _Stop
        return hook

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._store.clear()
        self._calls.clear()
        handles = [m.register_forward_hook(self._saver(layer)) for layer, m in self._modules_of.items()]
        try:
            try:
                self._store[PENULTIMATE] = pool(self.wrapper(x))
            except _Stop:
                pass
            if self._stop_early is None:
                self._stop_early = all(self._calls.get(layer) == 1 for layer in self._modules_of)
            return {layer: self._store[layer] for layer in self.layers}
        finally:
            for h in handles:
                h.remove()
            self._store.clear()


class Backbone(nn.Module):
    """A frozen network returning pooled embeddings for the requested layers.

    ``forward(x)`` takes a normalised batch (B, 3, H, W) and returns ``{layer: (B, D) float32}``
    in the order of ``layers``; 4-D activations are global-average pooled. Only the part of the
    network up to the last requested tap runs. ``net`` is the plain network (classifier replaced by
    nn.Identity); ``dims`` are measured widths; ``traced`` says whether torch.fx read the taps
    (else forward hooks did, and ``trace_error`` says why).
    """

    def __init__(self, spec: "ModelSpec", net: nn.Module, layers: Sequence[str], *, weights: str,
                 weights_file: str | None, weights_sha256: str | None, preprocess: "Preprocess", load_report: dict):
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
        self.trace_error: str | None = None
        if spec.reader is not None:   # the source's own way of reading taps (timm: forward_intermediates)
            taps: nn.Module = spec.reader(self.net, self.layers)
            self.dims = measure_dims(spec, self.layers)
        else:
            paths = {layer: "" if layer == PENULTIMATE else self._path(layer) for layer in self.layers}
            self.dims = measure_dims(spec, self.layers)
            wrapper = _Embedder(self.net, spec.embed)
            try:
                taps = _FxTaps(wrapper, paths)
            except UserError:
                raise
            except Exception as e:   # torch.fx cannot trace this network: see _HookTaps
                self.trace_error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
                taps = _HookTaps(wrapper, paths)
        # Not a registered submodule: it shares the network's modules, so .to()/.eval() on the
        # Backbone reach them through .net, and state_dict() stays the network's.
        object.__setattr__(self, "_taps", taps)

    @property
    def traced(self) -> bool:
        return self._taps.traced

    def _path(self, layer: str) -> str:
        self.module_for(layer)   # UserError with suggestions for an unknown name
        return tap_path(self.spec, layer)

    def module_for(self, tap_or_path: str) -> nn.Module:
        """The module behind a tap alias (``fc6``, ``layer3``) or a dotted module path."""
        return find_module(self.spec, self.net, tap_or_path)

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self._taps._apply(fn, recurse)   # tensors the traced graph holds itself (get_attr), if any
        return self

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._taps(x)
        return {layer: out[layer].float() for layer in self.layers}

    def tuple_module(self) -> tuple[nn.Module, dict[str, int]]:
        """For converters that trace a module (OpenVINO): a module returning the pooled taps as a tuple
        of distinct float32 tensors, and each layer's position in it (two taps that end on the same
        graph node share one output). Needs the torch.fx graph (``traced``) or a tap reader that runs
        as a plain module (timm's): forward hooks cannot be exported."""
        if hasattr(self._taps, "tuple_module"):
            return self._taps.tuple_module(), {layer: i for i, layer in enumerate(self.layers)}
        if not self.traced:
            raise UserError(f"{self.name}'s taps are read with forward hooks (torch.fx cannot trace it: "
                            f"{self.trace_error}), which cannot be exported: use --engine torch")
        nodes = list(dict.fromkeys(self._taps.node_of[layer] for layer in self.layers))
        return _TupleTaps(self._taps.graph_module, nodes), \
            {layer: nodes.index(self._taps.node_of[layer]) for layer in self.layers}

    def provenance(self) -> dict:
        return {"name": self.name, "source": self.spec.source, "weights": self.weights,
                "weights_file": self.weights_file,
                "weights_sha256": self.weights_sha256, "layers": list(self.layers), "dims": dict(self.dims),
                "preprocess": self.preprocess.as_dict(), "head_path": self.head_path,
                "load_report": {k: self.load_report.get(k) for k in ("missing", "unexpected", "prefix")}
                if self.load_report else {}}


__all__ = ["Backbone", "PENULTIMATE", "find_module", "measure_dims", "pool", "tap_path"]
