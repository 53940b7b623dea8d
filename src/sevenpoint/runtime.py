"""What this CPU can do, and the fast path chosen from it (measured, see docs/PERFORMANCE.md)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import platform
from pathlib import Path

import torch


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def cpu_fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (`model name`, `vendor_id`, `cpu family`,
    `model`, `flags`, ...); empty where there is no such file."""
    fields: dict[str, str] = {}
    for line in _cpuinfo_text().splitlines():
        if not line.strip():
            if fields:
                break  # the first processor's block is enough: every core of a machine here is alike
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> frozenset[str]:
    return frozenset(cpu_fields().get("flags", "").split())


# The ISA extensions that decide which oneDNN / ATen kernels run (and so which path is fastest).
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
# Settings that change the kernels of the same CPU (AVX2 emulation on an AVX-512 machine, for one).
KERNEL_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "ONEDNN_DEFAULT_FPMATH_MODE")


def cpu_identity() -> str:
    """What decides the kernels, as one string for cache keys: model name, vendor, family / model /
    stepping, the kernel-relevant ISA flags, the cores this process may use and any kernel-limiting
    environment settings. Two CPUs that share a model name (an AMD Zen 3 and a Zen 5 both say
    "AMD EPYC") differ here, so a cache shared between machines never hands one's choice to the other."""
    f = cpu_fields()
    flags = cpu_flags()
    isa = "+".join(x for x in KERNEL_FLAGS if x in flags) or "no-isa-flags"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    env = ",".join(f"{k}={os.environ[k]}" for k in KERNEL_ENV if os.environ.get(k))
    parts = [cpu_model(), f.get("vendor_id", platform.machine()),
             f"family {f.get('cpu family', '?')} model {f.get('model', '?')} stepping {f.get('stepping', '?')}",
             isa, f"{cores} cores"] + ([env] if env else [])
    return "; ".join(parts)


def cpu_supports_bf16() -> bool:
    """True when the CPU runs bf16 matmuls natively (AVX512-BF16 or AMX-BF16)."""
    flags = cpu_flags()
    if not ({"avx512_bf16", "amx_bf16"} & flags):
        return False
    limit = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()
    if limit and limit not in ("ALL", "DEFAULT") and not any(x in limit for x in ("BF16", "AMX", "FP16", "AVX10")):
        return False  # oneDNN told to stop below bf16 (e.g. AVX2 emulation): bf16 would be emulated
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def cpu_model() -> str:
    return cpu_fields().get("model name") or platform.processor() or "unknown"


def cpu_summary() -> dict:
    flags = cpu_flags()
    return {
        "machine": platform.machine(),
        "processor": cpu_model(),
        "identity": cpu_identity(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx_bf16": "amx_bf16" in flags,
        "bf16_fast": cpu_supports_bf16(),
    }


def use_bf16(precision: str, on_gpu: bool) -> bool:
    """`fp32` / `bf16` as requested; `auto` on a GPU: bf16 where it is supported. On a CPU `auto`
    is a measurement, not a rule: `choose_path` times the candidates."""
    if precision != "auto":
        return precision == "bf16"
    return on_gpu and torch.cuda.is_bf16_supported()


def use_channels_last(setting: str) -> bool:
    """`predict` / `serve`'s layout: channels_last unless `off` (train, evaluate and calibrate measure it)."""
    return setting == "on" or setting == "auto"


# name -> (channels_last, bf16): the CPU paths `train`, `evaluate` and `calibrate` choose between
PATHS = {"fp32": (False, False), "channels_last": (True, False), "bf16": (False, True),
         "channels_last+bf16": (True, True)}


def path_candidates(precision: str, channels_last: str) -> tuple[dict[str, tuple[bool, bool]], str]:
    """The CPU paths that `precision` (auto | fp32 | bf16) and `channels_last` (auto | on | off) leave
    open, and what was ruled out without timing: a pinned setting, or bf16 on a CPU without bf16
    units (emulated bf16 is never faster)."""
    why = []
    if precision == "auto" and not cpu_supports_bf16():
        precisions = [False]
        why.append("fp32 only: this CPU has no bf16 units (AVX512-BF16 / AMX)")
    elif precision == "auto":
        precisions = [False, True]
    else:
        precisions = [precision == "bf16"]
        why.append(f"precision {precision} pinned")
    layouts = [True, False] if channels_last == "auto" else [channels_last == "on"]
    if channels_last != "auto":
        why.append(f"channels_last {channels_last} pinned")
    return {n: p for n, p in PATHS.items() if p[0] in layouts and p[1] in precisions}, "; ".join(why)


def path_key(cfg, *parts: str) -> str:
    """The autotune cache key of a path choice for `cfg`'s model: the CPU (`cpu_identity`: model,
    family / model numbers, ISA flags, cores, kernel settings), torch version, threads, the caller's
    `parts` (what is timed, and how), the model config and the input size."""
    return "|".join([cpu_identity(), torch.__version__, str(torch.get_num_threads()), *parts,
                     json.dumps(dataclasses.asdict(cfg.model), sort_keys=True), str(cfg.data.image_size)])


def pick_path(key: str, candidates: dict, ruled_out: str, timed, rounds: int = 3, prune: float | None = None,
              cache: Path | None = None) -> tuple[str, str]:
    """(name, why) of the fastest of `candidates` (names from `path_candidates`): `timed(name)` is the
    factory `autotune` builds and times; `ruled_out` (what `path_candidates` excluded) ends the why.
    The timed steps draw nothing from the caller's random stream."""
    with torch.random.fork_rng(devices=[]):  # e.g. dropout in timed training steps
        choice, why = autotune(key, {n: timed(n) for n in candidates}, rounds=rounds, cache=cache, prune=prune)
    return choice, f"{why}{f' ({ruled_out})' if ruled_out else ''}"


TIMING_BATCH = 8  # paths are timed on at most this many cases: the ranking, not the rate, is wanted


def choose_path(mode: str, model: torch.nn.Module, cfg, batch: int, precision: str = "auto",
                channels_last: str = "auto", on_gpu: bool = False, rounds: int = 3,
                cache: Path | None = None, loss=None) -> tuple[bool, bool, str]:
    """(channels_last, bf16, why) for running `model` (a FusionModel built from `cfg`) in `mode`:
    `train` times forward + `loss(output, targets) -> (loss, parts)` + backward steps (the caller
    passes its training loss: this module knows no training code), `infer` forward passes, on min(`batch`,
    TIMING_BATCH) random cases, each candidate on its own copy of the model (`model` itself is not
    touched); a candidate more than 2.5x slower than the fastest in the warm-up is dropped there.
    Candidates are the paths `path_candidates` leaves open; the fastest is cached per CPU (`cpu_identity`),
    torch version, threads, mode, batch and model config (`autotune`). On a GPU: bf16 where
    supported (`use_bf16`), channels_last unless `off`."""
    if on_gpu:
        bf16, cl = use_bf16(precision, on_gpu=True), channels_last != "off"
        return cl, bf16, f"{'bf16' if bf16 else 'fp32'}, channels_last {'on' if cl else 'off'}: GPU default"
    candidates, ruled_out = path_candidates(precision, channels_last)
    size, batch = cfg.data.image_size, min(batch, TIMING_BATCH)

    def timing(name: str):
        cl, bf16 = PATHS[name]

        def build():
            import copy

            if mode == "train" and loss is None:
                raise ValueError("choose_path('train', ...) must time training steps: give loss=multitask_loss")
            from .schema import TASKS

            net = copy.deepcopy(model).train(mode == "train")
            fmt = torch.channels_last if cl else torch.contiguous_format
            if cl:
                net.to(memory_format=fmt)
            g = torch.Generator().manual_seed(0)
            images = [x.contiguous(memory_format=fmt) for x in net.example_inputs(batch, size, g)]
            meta = torch.zeros(batch, cfg.meta_dim)
            targets = torch.zeros(batch, len(TASKS), dtype=torch.long)

            def step():
                if mode == "train":
                    with bf16_autocast(bf16):
                        value, _ = loss(net(*images, meta), targets)
                    value.backward()
                    net.zero_grad(set_to_none=True)
                else:
                    with torch.no_grad(), bf16_autocast(bf16):
                        net(*images, meta)
            return step
        return build

    reads = "trunk" if any(getattr(m, "reads_trunk", False) for m in model.modules()) else "images"
    choice, why = pick_path(path_key(cfg, mode, f"batch{batch}", reads), candidates, ruled_out, timing, rounds, prune=2.5,
                            cache=cache)
    cl, bf16 = PATHS[choice]
    return cl, bf16, why


def bf16_autocast(enabled: bool, device_type: str = "cpu", tracing: bool = False) -> torch.autocast:
    """The one autocast context of the package: bf16 when `enabled`, a no-op otherwise. `tracing`
    turns the weight-cast cache off, which traced / frozen graphs need."""
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=enabled, cache_enabled=False if tracing else None)


def time_round_robin(fns: dict, warmup: int, repeats: int, tick=None) -> dict[str, list[float]]:
    """Seconds per call of each function, timed round robin (so a neighbour's load lands on every
    path alike): `warmup` untimed rounds, then `repeats` rounds each calling every function once.
    `tick()`, if given, is called after every call (a progress bar's update)."""
    import time

    for _ in range(warmup):
        for fn in fns.values():
            fn()
            if tick:
                tick()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            if tick:
                tick()
    return times


def _busy_cpu_seconds() -> float | None:
    """Seconds all CPUs of the machine have spent busy since boot (/proc/stat: everything but idle and
    iowait, steal included); None where there is no /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds this process (all its threads) has used."""
    return sum(os.times()[:2])


class CoreShare:
    """How many cores other processes kept busy while a block ran: the machine's busy CPU time
    (`/proc/stat`) less this process's own (`os.times`), over the wall time. `others` stays None where
    it cannot be told: off Linux, or a block under `shortest` seconds (the counters tick every 10 ms).
    `shared(threads)`: others took more than the cores `threads` leave free, by over half a core. In a
    container that sees the host's CPUs it counts the host's load against the host's cores."""

    def __init__(self, shortest: float = 0.5) -> None:
        self.shortest, self.others, self.wall = shortest, None, None

    def __enter__(self) -> "CoreShare":
        import time

        self._start = (time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc) -> None:
        import time

        wall0, busy0, own0 = self._start
        self.wall, busy, own = time.perf_counter() - wall0, _busy_cpu_seconds(), _own_cpu_seconds()
        if busy is not None and busy0 is not None and self.wall >= self.shortest:
            self.others = max(0.0, (busy - busy0) - (own - own0)) / self.wall

    def shared(self, threads: int) -> bool:
        return self.others is not None and self.others > max(0, (os.cpu_count() or 1) - threads) + 0.5


def autotune_cache_file() -> Path:
    """Where measured path choices are kept ($SEVENPOINT_AUTOTUNE, else ~/.cache/sevenpoint/autotune.json)."""
    return Path(os.environ.get("SEVENPOINT_AUTOTUNE", Path.home() / ".cache" / "sevenpoint" / "autotune.json"))


def autotune(key: str, candidates: dict, rounds: int = 5, cache: Path | None = None,
             prune: float | None = None) -> tuple[str, str]:
    """The fastest of `candidates` for `key`, timed round robin (`rounds` rounds after one warm-up
    each, median per candidate), and why. Each candidate is a zero-argument factory returning the
    callable that runs one step (a forward pass, a training step): nothing is built unless it has
    to be timed.

    The answer is cached under `key` (which should name the CPU model, torch version, threads and
    model config): a second call returns it without building or timing anything. A single
    candidate is returned untimed. `prune`: candidates whose warm-up call took more than `prune` x
    the fastest warm-up are not timed further (a naive path that is 5x slower need not be timed 5
    times to lose). A choice timed while other processes took the cores this one's threads needed
    (`CoreShare.shared`) is returned but not cached: the next call measures again
    (`SEVENPOINT_AUTOTUNE_SHARED=keep` caches it anyway; the test suite, whose workers share the cores
    on purpose, sets it).
    """
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
    with CoreShare() as share:
        warm = {n: t[0] for n, t in time_round_robin(runs, warmup=0, repeats=1).items()}  # first calls pick kernels
        dropped = {n: t for n, t in warm.items() if prune and t > prune * min(warm.values())}
        times = time_round_robin({n: f for n, f in runs.items() if n not in dropped}, warmup=0, repeats=rounds)
    medians = {name: statistics.median(t) for name, t in times.items()}
    choice = min(medians, key=medians.get)
    why = ", ".join([f"{n} {1000 * m:.1f} ms" for n, m in sorted(medians.items(), key=lambda kv: kv[1])]
                    + [f"{n} dropped after a {1000 * t:.0f} ms warm-up" for n, t in dropped.items()])
    if share.shared(torch.get_num_threads()) and os.environ.get("SEVENPOINT_AUTOTUNE_SHARED") != "keep":
        # a neighbour's load lands unevenly on the candidates (seen beside a training run: one path 9.8x slower)
        return choice, (f"{choice}: measured now while other processes kept {share.others:.1f} of "
                        f"{os.cpu_count()} cores busy, so used for this run only, not kept (median per step: {why})")
    known[key] = {"choice": choice, "why": f"median per step: {why}"}
    try:
        write_json(cache, known)
    except OSError:
        pass  # a read-only home: the choice is still made, just not kept
    return choice, f"{choice}: measured now (median per step: {why})"


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
