"""Per-epoch training checkpoints: everything needed to continue a run exactly."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from extract.errors import UserError

LAST = "last.pt"
BEST = "best.pt"


def save(path: Path, state: dict) -> None:
    """torch.save to a temporary name, then rename, so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """Load a checkpoint written by `save` (onto the CPU); UserError if missing or unreadable."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or foreign file
        raise UserError(f"cannot read checkpoint {path}: {e}") from None


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Settings that differ between a checkpoint's run and this one ("key: saved -> now")."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]
