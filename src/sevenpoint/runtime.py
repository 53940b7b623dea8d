"""What this CPU can do, and the fast path chosen from it (measured, see docs/PERFORMANCE.md)."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

import torch


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_supports_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


@functools.cache
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_summary() -> dict:
    flags = cpu_flags()
    return {
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "bf16_fast": cpu_supports_bf16(),
    }


def use_bf16(precision: str, backbone: str, on_gpu: bool) -> bool:
    """`auto`: bf16 on GPUs; on bf16 CPUs for the backbones whose registry entry says bf16 was
    measured faster (Xception; EfficientNet-Lite's depthwise convs were slower, docs/PERFORMANCE.md)."""
    from .models.backbones import BACKBONES

    if precision != "auto":
        return precision == "bf16"
    if on_gpu:
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16() and BACKBONES[backbone].cpu_bf16


def use_channels_last(setting: str) -> bool:
    return setting == "on" or setting == "auto"


def bf16_autocast(enabled: bool, device_type: str = "cpu", tracing: bool = False) -> torch.autocast:
    """The one autocast context of the package: bf16 when `enabled`, a no-op otherwise. `tracing`
    turns the weight-cast cache off, which traced / frozen graphs need."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False if tracing else None)
