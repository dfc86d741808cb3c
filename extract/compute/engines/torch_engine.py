"""The default engine: the backbone in torch eager mode (optionally torch.compile)."""

from __future__ import annotations

from extract.compute.engine import INT8, Embedder
from extract.compute.engines.base import Engine, EngineContext
from extract.core.errors import UserError


class TorchEngine(Engine):
    name = "torch"
    supports_compile = True

    def check_precision(self, autocast) -> None:
        if autocast == INT8:
            raise UserError("--precision int8 is a post-training quantized network, which --engine openvino "
                            "computes (pip install -e \".[int8]\"): add --engine openvino")

    def build(self, backbone, context: EngineContext) -> Embedder:
        return Embedder(backbone, context.device, context.autocast, context.preprocess, compile=context.compile)
