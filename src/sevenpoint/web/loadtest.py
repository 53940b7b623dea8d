"""A loopback load test for `sevenpoint serve`: N concurrent predictions, latency percentiles, errors."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import numpy as np


async def _one(client: httpx.AsyncClient, url: str, files: dict, data: dict) -> tuple[int, float]:
    t = time.perf_counter()
    r = await client.post(url, files=files, data=data)
    return r.status_code, time.perf_counter() - t


async def _run(base_url: str, derm: bytes, clinic: bytes | None, requests: int, concurrency: int,
               timeout: float) -> list[tuple[int, float]]:
    sem = asyncio.Semaphore(concurrency)
    files = {"derm": ("derm.jpg", derm, "image/jpeg")}
    if clinic:
        files["clinic"] = ("clinic.jpg", clinic, "image/jpeg")
    data = {"sex": "female", "location": "back", "elevation": "flat"}
    async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=concurrency)) as client:
        async def bounded():
            async with sem:
                try:
                    return await _one(client, f"{base_url}/api/predict", files, data)
                except httpx.HTTPError:
                    return -1, float("nan")
        return await asyncio.gather(*(bounded() for _ in range(requests)))


def run_load(base_url: str, derm: Path, clinic: Path | None = None, requests: int = 50, concurrency: int = 50,
             timeout: float = 120.0) -> dict:
    """Fire `requests` predictions, `concurrency` at a time; count statuses and latency percentiles."""
    start = time.perf_counter()
    results = asyncio.run(_run(base_url, Path(derm).read_bytes(), Path(clinic).read_bytes() if clinic else None,
                               requests, concurrency, timeout))
    wall = time.perf_counter() - start
    codes = [c for c, _ in results]
    ok = np.array([t for c, t in results if c == 200]) * 1000
    return {
        "requests": requests, "concurrency": concurrency, "wall_s": round(wall, 2),
        "status_counts": {str(c): codes.count(c) for c in sorted(set(codes))},
        "errors": sum(1 for c in codes if c != 200 and c != 503),
        "rejected_503": codes.count(503),
        "latency_ms_p50": round(float(np.percentile(ok, 50)), 1) if len(ok) else None,
        "latency_ms_p95": round(float(np.percentile(ok, 95)), 1) if len(ok) else None,
        "throughput_per_s": round(len(ok) / wall, 2),
    }
