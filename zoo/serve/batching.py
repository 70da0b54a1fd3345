"""Dynamic batching: requests from the event loop are queued and run as one forward pass in a worker thread.

The worker takes the oldest waiting sample, then waits until ``max_batch_size`` samples are queued or
``max_wait_s`` has passed since that sample arrived, and runs them together. Samples that waited while the
previous batch ran go out at once, so the wait only costs latency when the server is idle. The queue is
bounded: :meth:`DynamicBatcher.submit` raises :class:`Overloaded` (HTTP 503 + Retry-After) instead of
growing memory, and :meth:`DynamicBatcher.expected_wait_s` tells the app how long new work would wait (from
recent batch times), so it can refuse a request it could not answer in time before reading its body.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fusion_errors import FusionZooError

__all__ = ["DynamicBatcher", "Overloaded", "BatchStats"]

log = logging.getLogger("zoo.serve")


class Overloaded(FusionZooError):
    """The queue is full or the server is shutting down; retry after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class _Job:
    sample: Any
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: bool = False


@dataclass
class BatchStats:
    """Counters of the worker (read by ``GET /health`` and the load benchmark)."""

    batches: int = 0
    samples: int = 0
    max_batch: int = 0
    busy_s: float = 0.0
    sizes: dict[int, int] = field(default_factory=dict)
    busy_rejections: int = 0  # requests answered 503 before queueing: expected wait too long, or no slot in time
    recent_sample_s: float = 0.0  # busy seconds per sample over the last batches (each older batch weighs 0.8x)
    _recent_busy: float = 0.0
    _recent_samples: float = 0.0

    def record(self, size: int, took: float) -> None:
        """Count one batch of ``size`` samples that ran ``took`` seconds."""
        self.batches += 1
        self.samples += size
        self.max_batch = max(self.max_batch, size)
        self.busy_s += took
        self.sizes[size] = self.sizes.get(size, 0) + 1
        # weighted by size, so full batches (the ones an overload runs) dominate the per-sample time
        self._recent_busy = 0.8 * self._recent_busy + took
        self._recent_samples = 0.8 * self._recent_samples + size
        self.recent_sample_s = self._recent_busy / self._recent_samples

    def as_dict(self) -> dict[str, Any]:
        return {"batches": self.batches, "samples": self.samples, "max_batch": self.max_batch,
                "busy_rejections": self.busy_rejections, "recent_sample_ms": 1000.0 * self.recent_sample_s,
                "mean_batch": self.samples / self.batches if self.batches else 0.0,
                "mean_batch_ms": 1000.0 * self.busy_s / self.batches if self.batches else 0.0}


def _deliver(job: _Job, result: Any) -> None:
    """Runs on the event loop: hand a result or an exception to the waiting request (unless it gave up)."""
    if job.future.done():
        return
    if isinstance(result, BaseException):
        job.future.set_exception(result)
    else:
        job.future.set_result(result)


class DynamicBatcher:
    """Collect samples into batches for ``run_batch`` (a list of samples -> a list of results, same order).

    Args:
        run_batch: runs in the worker thread; may raise, then each sample of the batch is retried alone so one
            bad sample fails only its own request.
        max_batch_size: most samples per call of ``run_batch`` (1 disables batching).
        max_wait_s: longest time the oldest queued sample waits for others to join it.
        max_queue: most samples waiting (not counting the batch running); beyond it :meth:`submit` raises.
    """

    def __init__(self, run_batch: Callable[[list[Any]], Sequence[Any]], *, max_batch_size: int = 32,
                 max_wait_s: float = 0.005, max_queue: int = 256) -> None:
        if max_batch_size < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(f"need max_batch_size >= 1, max_queue >= 1, max_wait_s >= 0; got {max_batch_size}, "
                             f"{max_queue}, {max_wait_s}.")
        self.run_batch = run_batch
        self.max_batch_size = int(max_batch_size)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self.stats = BatchStats()
        self._pending: deque[_Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.running = 0  # samples of the batch in the worker now

    # event-loop side ---------------------------------------------------------------------------
    @property
    def depth(self) -> int:
        """Samples waiting for the worker."""
        return len(self._pending)

    @property
    def closing(self) -> bool:
        return self._closing

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1), from the mean batch time so far."""
        per_batch = self.stats.busy_s / self.stats.batches if self.stats.batches else 0.1
        return max(1, math.ceil((self.depth / self.max_batch_size + 1) * per_batch))

    def expected_wait_s(self, extra: int = 0) -> float:
        """Seconds until ``extra`` more samples would be answered: the batch running, the queue and ``extra``, at
        the recent busy time per sample (0 before the first batch: no estimate yet), and never less than the
        oldest queued sample has already waited (measured, so it holds when the CPU slows down under the
        estimate). Right after single-sample batches it overestimates a burst; one full batch corrects it."""
        estimate = (self.running + self.depth + extra) * self.stats.recent_sample_s
        try:
            oldest = time.monotonic() - self._pending[0].enqueued
        except IndexError:  # empty (the worker may take the last sample while this reads)
            oldest = 0.0
        return max(estimate, oldest)

    def start(self) -> None:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="fusion-zoo-batcher", daemon=True)
            self._thread.start()

    async def submit(self, samples: Sequence[Any]) -> list[Any]:
        """Queue ``samples`` (all or none) and wait for their results; raises the per-sample exception if any.

        Cancelling the caller (e.g. a request timeout) drops the samples that have not started running.
        """
        return await self.wait(self.enqueue(samples))

    def enqueue(self, samples: Sequence[Any]) -> list[_Job]:
        """Queue ``samples`` (all or none; :class:`Overloaded` when full or closing), from the event loop."""
        loop = asyncio.get_running_loop()
        jobs = [_Job(s, loop.create_future(), loop) for s in samples]
        with self._cond:
            if self._closing:
                raise Overloaded("the server is shutting down; retry on another instance or after the restart.",
                                 retry_after=5)
            if len(self._pending) + len(jobs) > self.max_queue:
                raise Overloaded(
                    f"the queue is full ({len(self._pending)} samples waiting, limit {self.max_queue} "
                    f"(--max-queue)); retry after the Retry-After seconds.", retry_after=self.retry_after())
            self._pending.extend(jobs)
            self._cond.notify()
        return jobs

    async def wait(self, jobs: list[_Job]) -> list[Any]:
        """The results of queued ``jobs``; cancelling drops those that have not started."""
        try:
            return list(await asyncio.gather(*(j.future for j in jobs)))
        except BaseException:
            for j in jobs:
                j.cancelled = True
                if not j.future.done():
                    j.future.cancel()
            raise

    def close(self, timeout: float | None = None) -> bool:
        """Refuse new samples, run the queued ones, stop the worker; True when it finished within ``timeout``."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # worker side -------------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._pending and not self._closing:
                self._cond.wait()
            if not self._pending:
                return None  # closing and drained
            deadline = self._pending[0].enqueued + self.max_wait_s
            while len(self._pending) < self.max_batch_size and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            n = min(self.max_batch_size, len(self._pending))
            return [self._pending.popleft() for _ in range(n)]

    def _run(self, jobs: list[_Job]) -> list[Any]:
        samples = [j.sample for j in jobs]
        try:
            results = list(self.run_batch(samples))
            if len(results) != len(samples):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(samples)} samples")
            return results
        except Exception as batch_error:
            if len(samples) == 1:
                return [batch_error]
        out: list[Any] = []
        for s in samples:  # isolate the failing sample(s): every other request still gets its answer
            try:
                out.append(self.run_batch([s])[0])
            except Exception as e:
                out.append(e)
        return out

    def _work(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            start = time.perf_counter()
            self.running = len(jobs)
            try:
                results = self._run(jobs)
            except BaseException as e:  # never let the worker die with requests waiting
                log.exception("batch of %d failed", len(jobs))
                results = [e] * len(jobs)
            took = time.perf_counter() - start
            self.running = 0
            self.stats.record(len(jobs), took)
            for job, result in zip(jobs, results, strict=True):
                try:
                    job.loop.call_soon_threadsafe(_deliver, job, result)
                except RuntimeError:  # the event loop is gone (hard shutdown): nobody is waiting any more
                    pass
