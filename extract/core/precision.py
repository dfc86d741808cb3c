"""Precision names and what `auto` means on a CPU, decided without importing torch."""

from __future__ import annotations

import os

PRECISIONS = ("auto", "fp32", "bf16", "fp16", "int8")

# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: torch and OpenVINO both honour them
_ISA_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 matrix instructions (AVX512-BF16 or AMX), unless
    ONEDNN_MAX_CPU_ISA caps oneDNN below them (e.g. AVX2, to behave as an AVX2-only CPU)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ISA_CAPS_WITHOUT_BF16:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_precision(precision: str) -> str:
    """The precision a CPU computes for a --precision value: 'fp32', 'bf16' or 'fp16' (auto: bf16 where
    `cpu_has_bf16`, else fp32)."""
    if precision == "auto":
        return "bf16" if cpu_has_bf16() else "fp32"
    return precision
