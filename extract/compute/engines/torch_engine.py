"""The default engine: the backbone in torch eager mode (optionally torch.compile)."""

from __future__ import annotations

from extract.compute.engine import Embedder
from extract.compute.engines.base import Engine, EngineContext


class TorchEngine(Engine):
    name = "torch"
    supports_compile = True

    def build(self, backbone, context: EngineContext) -> Embedder:
        return Embedder(backbone, context.device, context.autocast, context.preprocess, compile=context.compile)
