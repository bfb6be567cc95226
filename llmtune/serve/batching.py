"""Dynamic batching: concurrent requests wait in one bounded queue and run together on one worker thread.

The worker takes the oldest waiting request and adds the waiting requests of the same kind closest to it in
length, up to `max_batch_size` rows and `max_batch_tokens` (rows x the longest row's tokens), so batches
pad little. When the previous batch held one request (a lone client) it runs at once; under load it waits
up to `batch_wait_ms` for a batch to fill, and no longer than until as many rows wait as the previous batch
held. A full queue refuses new work (`QueueFull`, answered 503) instead of growing without bound. Work that
cannot share a batch (sampled or streamed generation) runs alone, in arrival order, on the same thread: the
model is never called concurrently.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds `max_queue` requests: come back later."""


@dataclass
class Job:
    """One request's work: rows to run in a batch under `kind`, or (kind None) a function to run alone."""

    kind: str | None
    rows: list[Any]
    tokens: int  # the request's longest row, in tokens
    run_alone: Callable[[], Any] | None = None
    future: asyncio.Future[Any] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    queued: float = field(default_factory=time.perf_counter)


@dataclass
class Limits:
    """How batches are formed."""

    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    batch_wait_ms: float = 5.0
    max_queue: int = 256


class Batcher:
    """The queue and the worker: `submit` a job, await its result."""

    def __init__(
        self,
        limits: Limits,
        run_batch: Callable[[str, list[Any]], list[Any]],
        on_batch: Callable[[int, int, float], None] | None = None,
    ) -> None:
        self.limits = limits
        self.run_batch = run_batch  # (kind, rows) -> one result per row, on the worker thread
        self.on_batch = on_batch  # (rows, tokens, seconds) after every batch, for metrics
        self.waiting: list[Job] = []
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmtune-model")
        self.wake = asyncio.Event()
        self.last_batch_rows = 1
        self.task: asyncio.Task[None] | None = None
        self.in_flight = 0

    @property
    def depth(self) -> int:
        """Requests waiting (not yet running)."""
        return len(self.waiting)

    def start(self) -> None:
        """Start the worker loop on the running event loop."""
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what is queued and running, then stop."""
        while self.waiting or self.in_flight:
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def submit(self, job: Job) -> Any:
        """Queue a job and wait for its result (its rows' results, or run_alone's return value)."""
        if len(self.waiting) >= self.limits.max_queue:
            raise QueueFull
        self.waiting.append(job)
        self.wake.set()
        return await job.future

    def _take(self) -> list[Job]:
        """The next batch: the oldest job plus same-kind jobs nearest in length, within the limits."""
        first = self.waiting[0]
        if first.kind is None:
            return [self.waiting.pop(0)]
        peers = sorted(
            (j for j in self.waiting[1:] if j.kind == first.kind), key=lambda j: abs(j.tokens - first.tokens)
        )
        chosen, rows, longest = [first], len(first.rows), first.tokens
        for job in peers:
            wider = max(longest, job.tokens)
            if rows + len(job.rows) > self.limits.max_batch_size:
                continue
            if wider * (rows + len(job.rows)) > self.limits.max_batch_tokens:
                continue
            chosen.append(job)
            rows, longest = rows + len(job.rows), wider
        for job in chosen:
            self.waiting.remove(job)
        return chosen

    async def _fill(self) -> None:
        """Under load, give a batch up to batch_wait_ms to fill; a lone client is served at once. The wait also
        ends once as many rows wait as the previous batch held: the clients it answered are back, and waiting
        longer would leave the model idle for nothing (closed-loop clients send nothing more until answered)."""
        if self.last_batch_rows <= 1 or self.limits.batch_wait_ms <= 0:
            return
        deadline = self.waiting[0].queued + self.limits.batch_wait_ms / 1000
        enough = min(self.limits.max_batch_size, self.last_batch_rows)
        while time.perf_counter() < deadline:
            same = sum(len(j.rows) for j in self.waiting if j.kind == self.waiting[0].kind)
            if same >= enough:
                return
            await asyncio.sleep(min(0.001, max(deadline - time.perf_counter(), 0)))

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting:
                self.wake.clear()
                await self.wake.wait()
                continue
            await self._fill()
            jobs = self._take()
            self.in_flight = len(jobs)
            started = time.perf_counter()
            try:
                if jobs[0].kind is None:
                    assert jobs[0].run_alone is not None
                    result = await loop.run_in_executor(self.executor, jobs[0].run_alone)
                    if not jobs[0].future.done():
                        jobs[0].future.set_result(result)
                else:
                    rows = [row for job in jobs for row in job.rows]
                    results = await loop.run_in_executor(self.executor, self.run_batch, jobs[0].kind, rows)
                    offset = 0
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_result(results[offset : offset + len(job.rows)])
                        offset += len(job.rows)
                    if self.on_batch is not None:
                        tokens = max(j.tokens for j in jobs) * len(rows)
                        self.on_batch(len(rows), tokens, time.perf_counter() - started)
                self.last_batch_rows = sum(max(len(j.rows), 1) for j in jobs)
            except Exception as exc:  # the error belongs to the requests of this batch
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
            finally:
                self.in_flight = 0
