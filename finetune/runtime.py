"""Autocast for a resolved precision (see extract.engine) and the global RNG state of a run."""

from __future__ import annotations

import random
from contextlib import nullcontext

import numpy as np
import torch

from extract.errors import UserError


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def check_precision(dtype: torch.dtype | None, device: torch.device) -> None:
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--precision fp16 needs a GPU; use bf16 or fp32 on the CPU")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast context for a resolved precision (a no-op for fp32)."""
    return nullcontext() if dtype is None else torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states of python, numpy and torch (CPU and CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
