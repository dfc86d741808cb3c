"""Autocast for a resolved precision (see extract.compute.engine) and the random state a run owns."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import numpy as np
import torch

from extract.core.errors import UserError


def check_precision(dtype: torch.dtype | None, device: torch.device) -> None:
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for a resolved precision (a no-op for fp32)."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed python, numpy, torch's CPU RNG and `device`'s RNG; give the caller's states back on exit."""
    saved = rng_state(device)
    try:
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        elif device.type == "mps":
            torch.mps.manual_seed(seed)
        yield
    finally:
        set_rng_state(saved, device)


def rng_state(device: torch.device) -> dict:
    """Global RNG states of python, numpy, torch's CPU and `device` (a CUDA or MPS device, named under "device_type"), as tensors and
    plain data, so that a checkpoint holding them loads with torch.load(weights_only=True)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
             "torch": torch.get_rng_state(), "device_type": device.type}
    if device.type == "cuda":
        state["device"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["device"] = torch.mps.get_rng_state()
    return state


def saved_device_type(state: dict) -> str:
    """The device type whose RNG a saved state holds (older states: cuda or mps when they hold one)."""
    return state.get("device_type") or ("cuda" if "device" in state else "cpu")


def set_rng_state(state: dict, device: torch.device) -> bool:
    """Restore `rng_state`'s states; `device`'s RNG only when the state was saved on that device type
    (a CPU checkpoint resumed on a GPU keeps the GPU's seeded RNG). True when everything was restored."""
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.int64).astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if device.type not in ("cuda", "mps"):
        return True
    if saved_device_type(state) != device.type or "device" not in state:
        return False
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["device"], device)
    else:
        torch.mps.set_rng_state(state["device"])
    return True
