"""Everything a user can ask of a fine-tuning run, as one frozen value built once and passed whole."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from extract.core.errors import UserError
from extract.run.request import DEFAULT_DATA, DEFAULT_MODEL

from finetune import schedule
from finetune.model import parse_freeze

OPTIMIZERS = ("sgd", "adamw")
# Small steps for a pretrained backbone (the new layer gets head_lr_mult x these). With sgd 0.01,
# EfficientNet-Lite0 on ants/bees fell from 0.93 to 0.67 test top-1 mid-run (README, finetune section).
DEFAULT_LR = {"sgd": 1e-3, "adamw": 1e-4}
DEFAULT_WEIGHT_DECAY = {"sgd": 1e-4, "adamw": 0.05}
_RULES = {"epochs": lambda v: v >= 1, "batch_size": lambda v: v >= 1, "lr": lambda v: v > 0,
          "head_lr_mult": lambda v: v >= 0, "momentum": lambda v: 0 <= v < 1, "weight_decay": lambda v: v >= 0,
          "warmup_epochs": lambda v: v >= 0, "label_smoothing": lambda v: 0 <= v < 1,
          "val_fraction": lambda v: 0 < v < 1, "test_fraction": lambda v: 0 < v < 1}


@dataclass(frozen=True)
class TrainConfig:
    """One fine-tuning run: the data and backbone (as extract names them), what trains, and how.

    The defaults are a small-data recipe: SGD with momentum, lr 1e-3 with the new layer at 10x,
    weight decay, 5 epochs (one of linear warmup, then cosine). lr / weight_decay None pick the
    optimizer's default (sgd 1e-3 / 1e-4, adamw 1e-4 / 0.05); head_lr_mult None is 10 for pretrained
    weights and 1 for random init. resume: True continues
    the run's last checkpoint, False starts over, None starts over unless an unfinished run exists.
    image_size N trains and evaluates on N x N inputs (None: the weights' own size). A dataset with
    only a train split gives up test_fraction of it as test rows, carved by split_seed as probe carves.
    """

    model: str = DEFAULT_MODEL
    data: str = DEFAULT_DATA
    weights: str | None = "default"
    root: str | None = None
    download: bool = False
    dataset_options: tuple[tuple[str, object], ...] = ()
    freeze: str = "none"
    from_scratch: bool = False
    epochs: int = 5
    batch_size: int = 32
    lr: float | None = None
    head_lr_mult: float | None = None
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float | None = None
    sched: str = "cosine"
    warmup_epochs: int = 1
    label_smoothing: float = 0.0
    seed: int = 0
    val_fraction: float = 0.2
    test_fraction: float = 0.2
    split_seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    workers: int | None = None
    image_size: int | None = None
    results_dir: str | os.PathLike = "results"
    runs_dir: str | os.PathLike = "runs"
    resume: bool | None = None
    progress: bool = True

    def __post_init__(self):
        if self.dataset_options is None or isinstance(self.dataset_options, dict):
            object.__setattr__(self, "dataset_options", tuple(sorted((self.dataset_options or {}).items())))
        for name, rule in _RULES.items():
            value = getattr(self, name)
            if value is not None and not rule(value):
                raise UserError(f"bad --{name.replace('_', '-')} {value!r}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"bad --workers {self.workers!r}")
        parse_freeze(self.freeze)
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"unknown optimizer {self.optimizer!r}: use {' or '.join(OPTIMIZERS)}")
        if self.sched not in schedule.SCHEDULES:
            raise UserError(f"unknown schedule {self.sched!r}: use {' or '.join(schedule.SCHEDULES)}")

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    @property
    def learning_rate(self) -> float:
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    @property
    def decay(self) -> float:
        return DEFAULT_WEIGHT_DECAY[self.optimizer] if self.weight_decay is None else self.weight_decay
