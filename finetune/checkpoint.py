"""Per-epoch training checkpoints: everything needed to continue a run exactly."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from extract.core.errors import UserError

from extract.registry.checkpoints import load_refusal
from finetune.runtime import rng_state, saved_device_type, set_rng_state

logger = logging.getLogger(__name__)

FORMAT = 3  # 2: torch schedulers (SequentialLR), RNG state of the run's own device; 3: tensors and plain data only
LAST = "last.pt"
BEST = "best.pt"


def save(path: Path, state: dict) -> None:
    """torch.save to a temporary name, then rename, so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: Path, then: str = "--no-resume starts over") -> dict:
    """Load a checkpoint written by `save` (onto the CPU) as tensors and plain data only, so a crafted
    file cannot run code; UserError if missing or unreadable, ending with `then`."""
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - truncated, foreign or crafted file
        raise UserError(f"cannot read checkpoint {path} ({load_refusal(e)}); {then}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path} is not a featprobe checkpoint; {then}")
    return state


def config_mismatch(saved: dict, current: dict) -> list[str]:
    """Settings that differ between a checkpoint's run and this one ("key: saved -> now")."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def save_epoch(run_dir: Path, *, epoch: int, config: dict, model, optimizer, scheduler, scaler, history: list,
               best: dict, improved: bool, device: torch.device) -> None:
    """Write last.pt (everything to continue exactly) and, when `improved`, best.pt (the weights)."""
    if improved:
        save(run_dir / BEST, {"epoch": epoch, "model": model.state_dict()})
    save(run_dir / LAST, {"format": FORMAT, "epoch": epoch, "config": config, "model": model.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                          "scaler": scaler.state_dict() if scaler else None, "rng": rng_state(device),
                          "history": history, "best": best})


def start_or_resume(run_dir: Path, config: dict, resume: bool | None, model, optimizer, scheduler, scaler,
                    device: torch.device) -> dict:
    """{"epoch", "history", "best"}: fresh, or the last checkpoint's, loaded into the model, optimizer,
    scheduler, scaler and global RNGs (torch's CPU and `device`'s). A run checkpointed on another
    device type (the CPU, resumed on a GPU) continues with a warning: its device RNG is not restored.

    resume True continues (settings must match), False starts over, None starts over unless
    an unfinished run is there (then UserError: say which); a checkpoint that cannot be read as
    tensors and plain data is an error with resume True and, with None, is discarded with a warning.
    """
    fresh = {"epoch": 0, "history": [], "best": None}
    last = run_dir / LAST
    if resume is False or (resume is None and not last.exists()):
        clear(run_dir)
        return fresh
    if not last.exists():
        raise UserError(f"nothing to resume: no checkpoint at {last}")
    try:
        ckpt = load(last, then="--no-resume starts over" if resume else "starting over")
    except UserError as e:
        if resume:
            raise
        logger.warning(f"warning: {e}")
        clear(run_dir)
        return fresh
    done, planned = ckpt.get("epoch", 0), ckpt.get("config", {}).get("epochs")
    if resume is None:
        if done >= (planned or 0):
            clear(run_dir)
            return fresh
        raise UserError(f"an unfinished run ({done} of {planned} epochs) is checkpointed in {run_dir}: "
                        "pass --resume to continue it or --no-resume to start over")
    if ckpt.get("format") != FORMAT:
        raise UserError(f"cannot resume {last}: it was written by an older version; --no-resume starts over")
    diff = config_mismatch(ckpt.get("config", {}), config)
    if diff:
        raise UserError(f"cannot resume {last}: settings differ ({'; '.join(diff)}); "
                        "use the original settings or --no-resume to start over")
    if not (run_dir / BEST).exists():
        raise UserError(f"cannot resume: {run_dir / BEST} is missing; --no-resume starts over")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if not set_rng_state(ckpt["rng"], device) or saved_device_type(ckpt["rng"]) != device.type:
        logger.warning(f"resuming on {device.type} a run checkpointed on {saved_device_type(ckpt['rng'])}: "
                       "it continues from the same weights and optimizer state, but not bit for bit as an "
                       "uninterrupted run would")
    if done < config["epochs"]:
        logger.info(f"resuming {run_dir} after epoch {done} of {config['epochs']}")
    return {"epoch": done, "history": list(ckpt["history"]), "best": ckpt["best"]}


def clear(run_dir: Path) -> None:
    """Remove a run's checkpoints."""
    for name in (LAST, BEST):
        (run_dir / name).unlink(missing_ok=True)
