"""Learning-rate schedules: linear warmup, then step decay or cosine annealing, per optimizer step."""

from __future__ import annotations

import math

import torch

SCHEDULES = ("step", "cosine")
STEP_GAMMA = 0.1
STEP_AT = (0.5, 0.75)  # fractions of the epochs after which the step schedule decays


def step_milestones(epochs: int, warmup_epochs: int = 0) -> list[int]:
    """Epochs at whose start the step schedule multiplies the lr by STEP_GAMMA."""
    marks = sorted({round(epochs * f) for f in STEP_AT})
    return [m for m in marks if warmup_epochs < m < epochs]


def lr_factor(step: int, *, name: str, epochs: int, steps_per_epoch: int, warmup_epochs: int = 0) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based)."""
    total = max(1, epochs * steps_per_epoch)
    warmup = min(warmup_epochs * steps_per_epoch, total)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if name == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if name == "step":
        epoch = step // max(1, steps_per_epoch)
        return STEP_GAMMA ** sum(epoch >= m for m in step_milestones(epochs, warmup_epochs))
    raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")


class _Factor:
    """Picklable lr_lambda (LambdaLR only saves callable objects' __dict__)."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, step: int) -> float:
        return lr_factor(step, **self.kwargs)


def make_scheduler(optimizer: torch.optim.Optimizer, *, name: str, epochs: int, steps_per_epoch: int,
                   warmup_epochs: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer step; every param group keeps its own base lr."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    fn = _Factor(name=name, epochs=epochs, steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def describe(*, name: str, epochs: int, steps_per_epoch: int, warmup_epochs: int, base_lr: float) -> dict:
    """JSON-able description of the schedule for result files."""
    d = {"name": name, "base_lr": base_lr, "warmup_epochs": warmup_epochs, "epochs": epochs,
         "steps_per_epoch": steps_per_epoch, "unit": "optimizer step"}
    if name == "step":
        d.update(milestones=step_milestones(epochs, warmup_epochs), gamma=STEP_GAMMA)
    return d
