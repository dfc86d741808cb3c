"""`--device` for the torch heads: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N."""

from __future__ import annotations

import os
import sys

from extract.core.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def cuda_available() -> bool:
    """torch.cuda.is_available(), without importing torch (seconds) on a Linux machine with no NVIDIA device."""
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/dxg")):
        return False
    import torch
    return torch.cuda.is_available()


def wants_cuda(name: str | None) -> bool:
    """Whether a --device request means CUDA (auto: when present)."""
    name = name or "auto"
    return cuda_available() if name == "auto" else name.startswith("cuda")


def resolve_device(name: str | None = "auto"):
    """The torch.device a request names; a UserError for unknown names, CUDA where there is none, or a
    cuda:N beyond the GPUs this process sees."""
    import torch

    from extract.compute.engine import check_gpu_index

    name = name or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and name != "cuda" and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {name} asked for, but CUDA is not available here")
    if name.startswith("cuda:"):
        check_gpu_index(name, int(name[5:]), torch.cuda.device_count())
    return torch.device(name)


def runtime_device(name: str | None):
    """Where a fitted head predicts: its device when this machine has it, else the CPU."""
    import torch
    try:
        return resolve_device(name)
    except UserError:
        return torch.device("cpu")
