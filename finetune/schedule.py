"""Learning-rate schedules from torch.optim.lr_scheduler: linear warmup, then step decay or cosine annealing.

Every schedule is stepped once per optimizer step, and every param group keeps its own base lr.
"""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, MultiStepLR, SequentialLR

SCHEDULES = ("step", "cosine")
STEP_GAMMA = 0.1
STEP_AT = (0.5, 0.75)  # fractions of the run at which the step schedule multiplies the lr by STEP_GAMMA


def _steps(epochs: int, steps_per_epoch: int, warmup_epochs: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps)."""
    total = max(1, epochs * steps_per_epoch)
    return total, min(warmup_epochs * steps_per_epoch, total)


def step_milestones(epochs: int, steps_per_epoch: int, warmup_epochs: int = 0) -> list[int]:
    """Optimizer steps after which the step schedule has multiplied the lr by STEP_GAMMA (none inside warmup)."""
    total, warmup = _steps(epochs, steps_per_epoch, warmup_epochs)
    return sorted({m for m in (int(total * f) for f in STEP_AT) if warmup < m < total})


def make_scheduler(optimizer: Optimizer, *, name: str, epochs: int, steps_per_epoch: int,
                   warmup_epochs: int = 0) -> LRScheduler:
    """LinearLR warmup (when warmup_epochs > 0) then CosineAnnealingLR to 0 or MultiStepLR, chained by SequentialLR."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {', '.join(SCHEDULES)}")
    total, warmup = _steps(epochs, steps_per_epoch, warmup_epochs)
    if name == "cosine":
        main = CosineAnnealingLR(optimizer, T_max=max(1, total - warmup))
    else:
        milestones = [m - warmup for m in step_milestones(epochs, steps_per_epoch, warmup_epochs)]
        main = MultiStepLR(optimizer, milestones=milestones, gamma=STEP_GAMMA)
    if warmup == 0:
        return main
    # The lr before step s < warmup is base * (s + 1) / (warmup + 1): never 0, full at the end.
    warm = LinearLR(optimizer, start_factor=1 / (warmup + 1), end_factor=1.0, total_iters=warmup)
    return SequentialLR(optimizer, [warm, main], milestones=[warmup])


def lr_scale(scheduler: LRScheduler) -> float:
    """The factor the schedule applies to the base lr now (first param group's lr over its initial lr)."""
    return scheduler.get_last_lr()[0] / scheduler.optimizer.param_groups[0]["initial_lr"]


def describe(*, name: str, epochs: int, steps_per_epoch: int, warmup_epochs: int, base_lr: float) -> dict:
    """JSON-able description of the schedule for result files."""
    total, warmup = _steps(epochs, steps_per_epoch, warmup_epochs)
    d = {"name": name, "base_lr": base_lr, "warmup_epochs": warmup_epochs, "epochs": epochs,
         "steps_per_epoch": steps_per_epoch, "unit": "optimizer step", "warmup_steps": warmup, "total_steps": total}
    if name == "step":
        d.update(milestones=step_milestones(epochs, steps_per_epoch, warmup_epochs), gamma=STEP_GAMMA)
    return d
