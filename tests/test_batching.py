"""The dynamic batcher on its own: who shares a batch, who gets which results, limits, shutdown."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from ragcap.serve.batching import Batcher, QueueFull, ShuttingDown


class Recorder:
    """run(): remembers each batch and answers each item with (key, item * 10)."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[tuple[object, list]] = []
        self.gate = gate
        self.entered = threading.Event()  # a batch has reached the model thread

    def __call__(self, key, items):
        self.entered.set()
        if self.gate is not None:
            self.gate.wait()
        self.batches.append((key, list(items)))
        if any(item == "boom" for item in items):
            raise ValueError("a bad batch")
        return [(key, item * 10) for item in items]


def run(test, *args, **kwargs):
    """Run an async test body with a batcher on a fresh loop and one model thread."""
    executor = ThreadPoolExecutor(1)

    async def main():
        batcher = Batcher(args[0], executor, **kwargs)
        batcher.start()
        try:
            return await test(batcher)
        finally:
            await batcher.close()

    try:
        return asyncio.run(main())
    finally:
        executor.shutdown()


def test_jobs_submitted_together_share_a_batch_and_get_their_own_slices():
    rec = Recorder()

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit("k", items) for items in ([1], [2, 3], [4])))

    answers = run(body, rec, max_batch=8, max_wait_s=1.0, max_queue=100)
    assert [results for results, _ in answers] == [[("k", 10)], [("k", 20), ("k", 30)], [("k", 40)]]
    assert rec.batches == [("k", [1, 2, 3, 4])]
    assert all(timing.batch_items == 4 for _, timing in answers)


def test_a_full_batch_does_not_wait_and_later_jobs_form_the_next():
    rec = Recorder()

    async def body(batcher):
        return await asyncio.gather(*(batcher.submit("k", [i]) for i in range(7)))

    # Full batches start at once; the remainder starts when the oldest job has waited max_wait.
    answers = run(body, rec, max_batch=3, max_wait_s=0.05, max_queue=100)
    assert [r for r, _ in answers] == [[("k", i * 10)] for i in range(7)]
    assert [items for _, items in rec.batches] == [[0, 1, 2], [3, 4, 5], [6]]


def test_a_job_alone_runs_at_once_in_its_own_batch_and_the_others_still_gather():
    rec = Recorder()

    async def body(batcher):
        jobs = [batcher.submit("k", [1]), batcher.submit("k", [2], alone=True), batcher.submit("k", [3]),
                batcher.submit("k", [4], alone=True)]
        return await asyncio.wait_for(asyncio.gather(*jobs), 30)

    # max_wait is an hour: a batch that waited for company would time the test out, and only the
    # two jobs not alone can fill a batch of 2.
    answers = run(body, rec, max_batch=2, max_wait_s=3600, max_queue=100)
    assert [r for r, _ in answers] == [[("k", 10)], [("k", 20)], [("k", 30)], [("k", 40)]]
    assert [items for _, items in rec.batches] == [[1, 3], [2], [4]]


def test_different_keys_never_share_a_batch_and_keep_their_order():
    rec = Recorder()

    async def body(batcher):
        return await asyncio.gather(batcher.submit("a", [1]), batcher.submit("b", [2]), batcher.submit("a", [3]))

    answers = run(body, rec, max_batch=8, max_wait_s=0.01, max_queue=100)
    assert [r for r, _ in answers] == [[("a", 10)], [("b", 20)], [("a", 30)]]
    assert rec.batches == [("a", [1, 3]), ("b", [2])]


def test_a_job_larger_than_max_batch_runs_whole_and_alone():
    rec = Recorder()

    async def body(batcher):
        return await asyncio.gather(batcher.submit("k", [1, 2, 3, 4, 5]), batcher.submit("k", [6]))

    run(body, rec, max_batch=2, max_wait_s=0.01, max_queue=100)
    assert [items for _, items in rec.batches] == [[1, 2, 3, 4, 5], [6]]


def test_an_error_goes_to_every_job_of_its_batch_and_the_next_batch_still_runs():
    rec = Recorder()

    async def body(batcher):
        bad = await asyncio.gather(batcher.submit("k", ["boom"]), batcher.submit("k", [1]), return_exceptions=True)
        good = await batcher.submit("k", [2])
        return bad, good

    bad, (good, _) = run(body, rec, max_batch=8, max_wait_s=0.01, max_queue=100)
    assert all(isinstance(e, ValueError) and "a bad batch" in str(e) for e in bad)
    assert good == [("k", 20)]


def test_queue_bound_counts_waiting_and_running_items():
    gate = threading.Event()
    rec = Recorder(gate)

    async def body(batcher):
        first = asyncio.ensure_future(batcher.submit("k", [1, 2]))
        second = asyncio.ensure_future(batcher.submit("k", [3]))
        await asyncio.sleep(0)  # let both enqueue
        assert batcher.pending == 3
        with pytest.raises(QueueFull, match="retry"):
            await batcher.submit("k", [4])
        gate.set()
        await asyncio.gather(first, second)
        assert batcher.pending == 0
        return await batcher.submit("k", [5])  # room again

    results, _ = run(body, rec, max_batch=1, max_wait_s=0, max_queue=3)
    assert results == [("k", 50)]


def test_a_cancelled_job_leaves_the_queue_unrun():
    gate = threading.Event()
    rec = Recorder(gate)

    async def body(batcher):
        running = asyncio.ensure_future(batcher.submit("k", [1]))
        await asyncio.get_running_loop().run_in_executor(None, rec.entered.wait)  # taken, stuck behind the gate
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(batcher.submit("k", [2]), 0.05)
        assert batcher.pending == 1
        gate.set()
        return await running

    results, _ = run(body, rec, max_batch=1, max_wait_s=0, max_queue=10)
    assert results == [("k", 10)] and [items for _, items in rec.batches] == [[1]]


def test_close_finishes_queued_jobs_without_waiting_and_refuses_new_ones():
    rec = Recorder()
    executor = ThreadPoolExecutor(1)

    async def main():
        batcher = Batcher(rec, executor, max_batch=100, max_wait_s=3600, max_queue=100)
        batcher.start()
        jobs = [asyncio.ensure_future(batcher.submit("k", [i])) for i in range(3)]
        await asyncio.sleep(0)
        await batcher.close()  # would otherwise wait an hour for 97 more items
        with pytest.raises(ShuttingDown):
            await batcher.submit("k", [9])
        return [await job for job in jobs]

    try:
        answers = asyncio.run(main())
    finally:
        executor.shutdown()
    assert [r for r, _ in answers] == [[("k", 0)], [("k", 10)], [("k", 20)]]
    assert rec.batches == [("k", [0, 1, 2])]
