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


def time_round_robin(fns: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round robin (so a neighbour's load lands on every
    path alike): `warmup` untimed rounds, then `repeats` rounds each calling every function once."""
    import time

    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def autotune_cache_file() -> Path:
    """Where measured path choices are kept ($SEVENPOINT_AUTOTUNE, else ~/.cache/sevenpoint/autotune.json)."""
    return Path(os.environ.get("SEVENPOINT_AUTOTUNE", Path.home() / ".cache" / "sevenpoint" / "autotune.json"))


def autotune(key: str, candidates: dict, rounds: int = 5, cache: Path | None = None) -> tuple[str, str]:
    """The fastest of `candidates` for `key`, timed round robin (`rounds` rounds after one warm-up
    each, median per candidate), and why. Each candidate is a zero-argument factory returning the
    callable that runs one forward pass: nothing is built unless it has to be timed.

    The answer is cached under `key` (which should name the CPU model, torch version, threads and
    model config): a second call returns it without building or timing anything. A single
    candidate is returned untimed.
    """
    import json
    import statistics

    from .atomic import write_json

    if len(candidates) == 1:
        name = next(iter(candidates))
        return name, f"{name}: the only candidate"
    cache = cache or autotune_cache_file()
    try:
        known = json.loads(cache.read_text()) if cache.is_file() else {}
    except (OSError, ValueError):
        known = {}  # an unreadable cache is re-measured, never trusted
    hit = known.get(key)
    if isinstance(hit, dict) and hit.get("choice") in candidates:
        return hit["choice"], f"{hit['choice']}: measured earlier on this machine ({hit['why']}; cache {cache})"
    runs = {name: make() for name, make in candidates.items()}
    times = time_round_robin(runs, warmup=1, repeats=rounds)  # warm-up: first calls pick kernels
    medians = {name: statistics.median(t) for name, t in times.items()}
    choice = min(medians, key=medians.get)
    why = ", ".join(f"{n} {1000 * m:.1f} ms" for n, m in sorted(medians.items(), key=lambda kv: kv[1]))
    known[key] = {"choice": choice, "why": f"median per forward: {why}"}
    try:
        write_json(cache, known)
    except OSError:
        pass  # a read-only home: the choice is still made, just not kept
    return choice, f"{choice}: measured now (median per forward: {why})"


class ThreadGovernor:
    """Keeps batch-1 latency graceful when another process takes a core.

    With every core's thread spin-waiting (OpenMP's default, the fastest alone), a busy neighbour
    on one core stalls every parallel region: measured 4.4x slower (docs/PERFORMANCE.md), while one
    thread only loses its share. `record` each forward pass's time for its batch size; when the
    recent median exceeds `slow` x the best seen at full threads, drop to one thread; after
    `retry_s` seconds try full threads again (kept if they are fast again).
    """

    def __init__(self, full: int | None = None, window: int = 5, slow: float = 1.6, retry_s: float = 20.0,
                 clock=None) -> None:
        import time

        self.full = full or torch.get_num_threads()
        self.window, self.slow, self.retry_s = window, slow, retry_s
        self.clock = clock or time.monotonic
        self.best: dict[int, float] = {}   # batch size -> fastest time at full threads
        self.recent: dict[int, list[float]] = {}
        self.reduced_since: float | None = None
        self.switches = 0

    @property
    def threads(self) -> int:
        return 1 if self.reduced_since is not None else self.full

    def record(self, batch: int, seconds: float) -> None:
        import statistics

        if self.full <= 1:
            return
        if self.reduced_since is not None:
            if self.clock() - self.reduced_since >= self.retry_s:  # try the full width again
                self._set(None)
            return
        self.best[batch] = min(self.best.get(batch, seconds), seconds)
        recent = self.recent.setdefault(batch, [])
        recent.append(seconds)
        del recent[:-self.window]
        if len(recent) == self.window and statistics.median(recent) > self.slow * self.best[batch]:
            self._set(self.clock())

    def _set(self, reduced_since: float | None) -> None:
        self.reduced_since = reduced_since
        self.recent.clear()
        self.switches += 1
        torch.set_num_threads(self.threads)
