"""Micro-batching for the server: concurrent requests share forward passes.

Each request is prepared (decoded, checked) in its own thread; the prepared case is then queued
here. One worker thread takes the first waiting case, waits at most `max_wait_ms` for more (up
to `max_batch`), runs them as one batch and hands each request its own result. A single client
pays at most `max_wait_ms` extra; many clients get the batch throughput. Only the worker runs
the model, so forward passes never overlap (the model's threads already use every core).
"""

from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field


_STOP = object()
_LIVE: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
    """Stop every worker before the interpreter finalises: a daemon thread still parked in torch or
    in a lock when finalisation kills it can abort the process ("terminate called ...")."""
    for batcher in list(_LIVE):
        batcher.close()


@dataclass
class BatchStats:
    batches: int = 0
    cases: int = 0
    largest: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def to_dict(self) -> dict:
        return {"batches": self.batches, "cases": self.cases, "largest": self.largest,
                "mean_size": round(self.cases / self.batches, 2) if self.batches else None,
                "sizes": dict(sorted(self.sizes.items()))}


class MicroBatcher:
    """`submit(item)` -> a Future of `run([item, ...])`'s entry for that item."""

    def __init__(self, run: Callable[[Sequence[object]], Sequence[object]], max_batch: int = 8,
                 max_wait_ms: float = 5.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch {max_batch} must be >= 1 and max_wait_ms {max_wait_ms} >= 0")
        self.run, self.max_batch, self.max_wait = run, max_batch, max_wait_ms / 1000
        self.stats = BatchStats()
        self._queue: queue.Queue[tuple[object, Future]] = queue.Queue()
        self._stopping = False
        self._worker = threading.Thread(target=self._loop, name="sevenpoint-batcher", daemon=True)
        self._worker.start()
        _LIVE.add(self)

    def submit(self, item: object) -> Future:
        future: Future = Future()
        self._queue.put((item, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Finish what is queued, then stop the worker."""
        if self._worker.is_alive():
            self._queue.put((_STOP, None))
            self._worker.join(timeout)

    def _take(self) -> list[tuple[object, Future]]:
        batch = [self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch and batch[-1][0] is not _STOP:
            try:  # whatever is already waiting joins at once; then wait out the rest of the window
                batch.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                break
        if batch[-1][0] is _STOP:
            self._stopping = True
            batch.pop()
        return batch

    def _loop(self) -> None:
        while not self._stopping:
            batch = [(item, fut) for item, fut in self._take() if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self.run([item for item, _ in batch])
            except BaseException as exc:  # noqa: BLE001 - handed to every waiting request
                for _, fut in batch:
                    fut.set_exception(exc)
                continue
            n = len(batch)
            self.stats.batches += 1
            self.stats.cases += n
            self.stats.largest = max(self.stats.largest, n)
            self.stats.sizes[n] = self.stats.sizes.get(n, 0) + 1
            for (_, fut), result in zip(batch, results):
                fut.set_result(result)
