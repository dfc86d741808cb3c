"""Everything a user can ask of extract, as one frozen value built once and passed whole."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from extract.core.errors import UserError
from extract.core.precision import PRECISIONS
from extract.store.chunks import DEFAULT_CHUNK_ROWS
from extract.store.identity import NORMALIZE_CHOICES
from extract.store.preprocess import check_image_size

DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_DATA = "digits"
DTYPES = ("float32", "float16")
ON_ERROR = ("skip", "stop")


@dataclass(frozen=True)
class ExtractRequest:
    """One extraction request: which features (model, data, taps, preprocessing, precision, engine)
    and how to compute them (batching, workers, runner). Built from the command line or from
    `extract(**keywords)`; checked once in `__post_init__`."""

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    weights: str | None = "default"
    layers: tuple[str, ...] | None = None
    root: str | None = None
    download: bool = False
    dataset_options: tuple[tuple[str, object], ...] = ()
    splits: tuple[str, ...] | None = None
    cache_dir: str | os.PathLike = "cache"
    device: str = "auto"
    precision: str = "auto"
    dtype: str = "float32"
    image_size: int | None = None
    normalize: str = "weights"
    engine: str = "torch"
    decoder: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    chunk_rows: int = DEFAULT_CHUNK_ROWS
    runner: str = "auto"            # "auto": torchrun when launched by it, Ray when `ray` is set, else this process
    ray: str | None = None          # Ray address for the ray runner
    compile: bool = False
    on_error: str = "skip"
    overwrite: bool = False
    allow_missing_weights: bool = False
    progress: bool = True

    def __post_init__(self):
        fix = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 - frozen: normalise once
        if self.dataset_options is None or isinstance(self.dataset_options, dict):
            fix("dataset_options", tuple(sorted((self.dataset_options or {}).items())))
        for name in ("layers", "splits"):
            value = getattr(self, name)
            if value is not None:
                fix(name, (value,) if isinstance(value, str) else tuple(value))
        fix("image_size", check_image_size(self.image_size))
        if self.dtype not in DTYPES:
            raise UserError(f"unknown dtype {self.dtype!r}: use {' or '.join(DTYPES)}")
        if self.normalize not in NORMALIZE_CHOICES:
            raise UserError(f"unknown --normalize {self.normalize!r}: use {' or '.join(NORMALIZE_CHOICES)}")
        if self.on_error not in ON_ERROR:
            raise UserError(f"unknown --on-error {self.on_error!r}: use {' or '.join(ON_ERROR)}")
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.precision == "int8" and (self.ray or self.runner == "ray"):
            raise UserError("--precision int8 calibrates the network in the process that runs it: drop --ray "
                            "(one machine: the default runner or torchrun)")
        if (self.batch_size is not None and self.batch_size < 1) or self.chunk_rows < 1:
            raise UserError("batch size and chunk size must be at least 1")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers takes 0 or more, got {self.workers}")

    def replace(self, **changes) -> "ExtractRequest":
        return dataclasses.replace(self, **changes)

    @property
    def options(self) -> dict:
        return dict(self.dataset_options)
