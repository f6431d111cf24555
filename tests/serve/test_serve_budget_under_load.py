"""Speculation under load, through the server's own path (the engine thread): with step costs that make verified
tokens dear in a wide batch, drafts are full when a request runs alone and back off to plain steps when 32 run."""
from __future__ import annotations

import asyncio
import statistics

import decodekit
from decodekit.serve.metrics import ServerMetrics
from decodekit.serve.schemas import Work
from decodekit.serve.worker import Done, EngineWorker, Job
from decodekit.speculative.budget import StepCosts

PROMPT = "abc abc abc abc abc abc abc abc"


class FixedCosts(StepCosts):
    """Step times set by the test, not measured: alone a wide verify pass costs about a plain step; in a batch of b
    sequences every extra verified token of a row costs b times as much (the pass is compute-bound)."""

    def __init__(self) -> None:
        super().__init__()
        for b in (1, 2, 4, 8, 16, 32, 64):
            for w in (1, 2, 4, 8, 16, 32):
                self.times[(b, w)] = 0.1 * (1 + 0.05 * b * (w - 1))

    def record(self, batch: int, width: int, seconds: float) -> None:
        pass


def run(worker: EngineWorker, prompts: list[str], max_new_tokens: int) -> None:
    async def main():
        loop = asyncio.get_running_loop()
        options = {"method": "pld", "ignore_eos": True}
        jobs = [Job(Work([p], max_new_tokens, options, 1, False), loop, 600) for p in prompts]
        for job in jobs:
            worker.submit(job)
        for job in jobs:
            while not any(isinstance(e, (Done, Exception)) for e in await job.events.get()):
                pass

    asyncio.run(main())


def test_drafts_back_off_as_the_batch_grows():
    engine = decodekit.load("random:tiny-llama", device="cpu")
    engine.core.costs["pld"] = FixedCosts()
    steps = []  # per step: (decoding sequences, draft size of each)
    inner = engine.step

    def recording_step():
        updated = inner()
        decoding = [s for s in engine.core.scheduler.running if s.output and s.budget is not None]
        assert all(s.budget is not None for s in updated if s.output)  # the server's path: adaptive drafts
        steps.append((len(decoding), [len(s.tree) for s in decoding]))
        return updated

    engine.step = recording_step
    worker = EngineWorker(engine, ServerMetrics(), max_in_flight=64)
    worker.start()
    try:
        run(worker, [PROMPT], 96)
        alone = [d for n, sizes in steps if n == 1 for d in sizes]
        steps.clear()
        run(worker, [f"{PROMPT} {i}" for i in range(32)], 48)
        crowded = [d for n, sizes in steps if n >= 16 for d in sizes]
    finally:
        worker.stop()
    assert len(alone) > 30 and len(crowded) > 500
    drafted = lambda sizes: sum(d > 0 for d in sizes) / len(sizes)  # noqa: E731
    # Alone: drafts on most steps (not all: the first steps measure the plain step, and where the random model's
    # text leaves its loop the drafts miss and shrink).
    assert drafted(alone) > 0.5 and statistics.mean(alone) >= 1.0
    # 32 at once: plain steps, but for the budget's rare probes.
    assert drafted(crowded) < 0.1 and statistics.mean(crowded) < statistics.mean(alone) / 5
