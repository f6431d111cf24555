"""The engine thread on its own (no HTTP): events in order, a failing step answers its requests with a 500 and the
thread goes on serving, cancellation frees the KV memory, and idle means asleep."""
from __future__ import annotations

import asyncio
import time

import pytest

import decodekit
from decodekit.serve.metrics import ServerMetrics
from decodekit.serve.schemas import APIError, Work
from decodekit.serve.worker import Accepted, Delta, Done, EngineWorker, Job, QueueFull


@pytest.fixture
def worker():
    engine = decodekit.load("random:tiny-llama", device="cpu")
    w = EngineWorker(engine, ServerMetrics(), max_in_flight=4)
    w.start()
    yield w
    w.stop()
    assert not w.alive


def events_of(worker: EngineWorker, work: Work, cancel_after: int | None = None) -> list:
    async def main():
        job = Job(work, asyncio.get_running_loop(), 600)
        worker.submit(job)
        seen = []
        while True:
            batch = await asyncio.wait_for(job.events.get(), 60)
            seen += batch
            if cancel_after is not None and len(seen) >= cancel_after:
                worker.cancel(job)
                return seen
            if any(isinstance(e, (Done, APIError)) for e in batch):
                return seen

    return asyncio.run(main())


def test_events_come_in_order_and_add_up_to_the_result(worker):
    # The worker's thread owns its engine: the reference comes from another one.
    reference = decodekit.load("random:tiny-llama", device="cpu").generate("Hello there", 12, temperature=0, n=2)
    work = Work(["Hello there"], 12, {"temperature": 0, "n": 2}, n=2, chat=False)
    events = events_of(worker, work)
    assert isinstance(events[0], Accepted) and isinstance(events[-1], Done)
    for index in (0, 1):
        deltas = [e for e in events if isinstance(e, Delta) and e.index == index]
        assert "".join(d.text for d in deltas) == reference[index].text
        assert [d.finish_reason for d in deltas if d.finish_reason] == [reference[index].finish_reason]
    assert events[-1].completion_tokens == sum(len(r.token_ids) for r in reference)


def test_a_failing_step_fails_its_requests_and_the_thread_serves_on(worker):
    inner, calls = worker.engine.step, []

    def broken_once():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated bug")
        return inner()

    worker.engine.step = broken_once
    events = events_of(worker, Work(["x"], 20, {"ignore_eos": True}, 1, False))
    assert isinstance(events[-1], APIError) and events[-1].status == 500
    assert worker.alive
    events = events_of(worker, Work(["y"], 5, {}, 1, False))
    assert isinstance(events[-1], Done)


def test_cancelling_frees_the_kv_memory_and_the_place(worker):
    alloc = worker.engine.core.pool.allocator
    events_of(worker, Work(["long"], 1000, {"ignore_eos": True}, 1, False), cancel_after=3)
    deadline = time.monotonic() + 5
    while (alloc.num_free < alloc.capacity or worker.engine.core.has_work()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alloc.num_free == alloc.capacity and not worker.engine.core.has_work()
    assert worker._in_flight == 0


def test_a_full_worker_refuses_and_an_invalid_request_is_a_400(worker):
    async def main():
        loop = asyncio.get_running_loop()
        jobs = [Job(Work(["z"], 500, {"ignore_eos": True}, 1, False), loop, 600) for _ in range(4)]
        for job in jobs:
            worker.submit(job)
        with pytest.raises(QueueFull):
            worker.submit(Job(Work(["z"], 5, {}, 1, False), loop, 600))
        for job in jobs:
            worker.cancel(job)

    asyncio.run(main())
    deadline = time.monotonic() + 5
    while worker._in_flight and time.monotonic() < deadline:  # the cancellations reach the engine thread
        time.sleep(0.01)
    events = events_of(worker, Work(["x" * 5000], 5, {}, 1, False))  # longer than the 2048-token context
    assert len(events) == 1 and events[0].status == 400 and "context window" in events[0].message


def test_an_idle_worker_sleeps(worker):
    time.sleep(0.2)
    steps = []
    inner = worker.engine.step
    worker.engine.step = lambda: steps.append(1) or inner()
    time.sleep(1.5)
    assert steps == []  # no request, no step (the thread only wakes to refresh the windowed metrics)
