"""What an engine is: something that runs a frozen backbone over uint8 batches on one device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from extract.store.preprocess import Preprocess

if TYPE_CHECKING:
    import torch

    from extract.compute.calibration import Calibration


@dataclass(frozen=True)
class EngineContext:
    """Everything an engine needs to build its embedder, besides the backbone."""

    device: torch.device
    autocast: torch.dtype | None
    preprocess: Preprocess
    workdir: Path                  # where an engine may keep what it converts (beside the cache files)
    threads: int | None = None     # CPU threads for compute (the cores decode workers leave)
    compile: bool = False
    calibration: Calibration | None = None   # for --precision int8: the images it is calibrated on
    decoder: str = "tensor"        # how image files are decoded (calibration images are decoded the same way)


class Engine:
    """An inference engine. A new one is a subclass in its own file plus one `register_engine` line.

    Its embedder is called with a uint8 batch and returns {tap: (B, D) float tensor}; it has
    `device`, `preprocess` and `provenance()` (a dict recorded in the cache file).
    """

    name = ""
    supports_compile = False

    def check(self, device: str) -> None:
        """UserError when this engine cannot serve the device asked for (or is not installed)."""

    def device(self, requested: str) -> torch.device:
        """The device it runs on for a --device value."""
        from extract.compute.engine import resolve_device

        return resolve_device(requested)

    def check_precision(self, autocast: torch.dtype | None) -> None:
        """UserError for a precision this engine cannot compute here."""

    def preferred(self, device: torch.device, precision: str) -> bool:
        """Whether --engine auto should pick this engine over torch for the device and precision."""
        return False

    def build(self, backbone, context: EngineContext):
        raise NotImplementedError
