"""Dynamic batching: concurrent requests become one batch for the models.

Each request submits a job, its items (images, texts or search queries) under a key that says
what is to be done with them (e.g. caption with these settings). One worker takes the oldest
job's key, gathers every queued job with that key up to max_batch items (waiting at most
max_wait after the oldest arrived for more to come), runs them in one call on the model thread,
and hands each job the slice of results that belongs to its items. While the model thread runs
one batch the next one gathers, so under load batches fill without any waiting, and a batch of
32 one-image requests costs what the CLI's batch of 32 images costs.

The model thread is a single thread: torch already spreads one batch over every core, and the
embedded store and the models are then never used by two threads at once.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Callable, Hashable


class QueueFull(Exception):
    """More items are waiting than the queue holds; the client should retry later."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


@dataclass
class JobTiming:
    queue_s: float  # from submission to the start of its batch
    compute_s: float  # the batch's run time
    batch_items: int  # items in its batch (its own and other requests')


@dataclass
class _Job:
    key: Hashable
    items: list
    future: asyncio.Future
    alone: bool  # runs in a batch of its own, at once
    submitted: float = field(default_factory=time.perf_counter)


class Batcher:
    """run(key, items) -> one result per item, called on `executor` with batches of jobs' items."""

    def __init__(self, run: Callable[[Hashable, list], list], executor: Executor, max_batch: int, max_wait_s: float,
                 max_queue: int, on_batch: Callable[[Hashable, int, float], None] | None = None):
        self.run, self.executor = run, executor
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.on_batch = on_batch or (lambda key, items, seconds: None)
        self._jobs: collections.deque[_Job] = collections.deque()
        self._pending = 0  # items queued or running: what max_queue bounds
        self._arrived = asyncio.Event()
        self._closing = False  # no new jobs
        self._draining = False  # no waiting for company: batches start as soon as the model is free
        self._worker: asyncio.Task | None = None

    @property
    def pending(self) -> int:
        return self._pending

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="ragcap-batcher")

    def drain(self) -> None:
        """Stop waiting for more requests to join a batch (the server has stopped taking them)."""
        self._draining = True
        self._arrived.set()

    async def close(self) -> None:
        """Refuse new jobs, finish every queued one, stop."""
        self._closing = True
        self.drain()
        if self._worker is not None:
            await self._worker

    async def submit(self, key: Hashable, items: list, alone: bool = False) -> tuple[list, JobTiming]:
        """The results for `items` (in order) and how the job was timed; raises what run raised.
        alone: no other job joins this one's batch (its results would depend on the company)."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self._pending + len(items) > self.max_queue:
            raise QueueFull(f"{self._pending} items are waiting (the queue holds {self.max_queue}); retry shortly")
        job = _Job(key, items, asyncio.get_running_loop().create_future(), alone)
        self._jobs.append(job)
        self._pending += len(items)
        self._arrived.set()
        try:
            return await job.future
        except asyncio.CancelledError:  # the request timed out or went away: drop its work if not started
            if job in self._jobs:
                self._jobs.remove(job)
                self._pending -= len(items)
            raise

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._jobs:
                if self._closing:
                    return
                self._arrived.clear()
                await self._arrived.wait()
            first = self._jobs[0]
            key, deadline = first.key, first.submitted + self.max_wait_s
            while (not first.alone and not self._draining and self._count(key) < self.max_batch
                   and (left := deadline - time.perf_counter()) > 0):
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = [self._jobs.popleft()] if first.alone else self._take(key)
            items = [item for job in batch for item in job.items]
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run, key, items)
                if len(results) != len(items):
                    raise RuntimeError(f"a batch of {len(items)} items gave {len(results)} results")
            except Exception as err:  # noqa: BLE001 - every job of the batch gets the error, the worker goes on
                results, error = None, err
            seconds = time.perf_counter() - started
            self._pending -= len(items)
            self.on_batch(key, len(items), seconds)
            start = 0
            for job in batch:
                if not job.future.done():  # a job whose request timed out meanwhile is dropped
                    if results is None:
                        job.future.set_exception(error)
                    else:
                        timing = JobTiming(started - job.submitted, seconds, len(items))
                        job.future.set_result((results[start : start + len(job.items)], timing))
                start += len(job.items)

    def _count(self, key: Hashable) -> int:
        return sum(len(job.items) for job in self._jobs if job.key == key and not job.alone)

    def _take(self, key: Hashable) -> list[_Job]:
        """The oldest jobs with `key`, in order, up to max_batch items (at least one job, however large)."""
        taken, kept, size, full = [], collections.deque(), 0, False
        for job in self._jobs:
            if job.key == key and not job.alone and not full and (not taken or size + len(job.items) <= self.max_batch):
                taken.append(job)
                size += len(job.items)
            else:
                full = full or (job.key == key and not job.alone)  # later jobs with the key wait their turn
                kept.append(job)
        self._jobs = kept
        return taken

