"""The engine thread: the one owner of the Engine, driving `add_request` / `step` / `abort` for every HTTP request.

HTTP handlers run on the asyncio loop; they hand a `Job` to `EngineWorker.submit` (thread-safe) and read its events
from the job's asyncio queue. The engine thread loops: take new jobs and cancellations from its inbox -> one
`engine.step()` -> for each job with updated sequences, one batch of events (new text, logprobs, finish, usage)
pushed to the job's queue with `loop.call_soon_threadsafe`. It sleeps on a condition when there is no work. Requests
join and leave the running batch between steps (continuous batching); the core's scheduler prefills long prompts in
chunks beside running decodes, and each sequence's draft budget sizes its drafts for the batch it runs in.

Everything that touches the engine, the tokenizer included (tokenizing, chat templates, validation), happens on
this thread.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from jinja2 import TemplateError

from .metrics import ServerMetrics
from .schemas import APIError, Work

log = logging.getLogger("decodekit.serve")


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class Delta:
    """What one step added to one choice."""

    index: int
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class Accepted:
    """The request is valid and queued."""


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


class QueueFull(Exception):
    pass


@dataclass
class _Choice:
    shown: int = 0  # characters sent
    tokens: int = 0  # output tokens seen
    logprobs: int = 0  # logprob entries sent
    decode_steps: int = 0


@dataclass
class Job:
    """One HTTP request: its work, where its events go, and (on the engine thread) its engine requests."""

    work: Work
    loop: asyncio.AbstractEventLoop
    timeout: float
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.perf_counter)
    requests: list[Any] = field(default_factory=list)
    choices: dict[int, _Choice] = field(default_factory=dict)
    first_token: bool = False
    closed: bool = False  # finished, failed or cancelled: no more events

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout


class EngineWorker:
    """Runs the engine on its own thread. `max_in_flight` bounds accepted, unfinished requests (running + queued);
    past it `submit` raises QueueFull."""

    def __init__(self, engine, metrics: ServerMetrics, max_in_flight: int, idle_wake: float = 1.0) -> None:
        self.engine, self.metrics, self.max_in_flight = engine, metrics, max_in_flight
        self.idle_wake = idle_wake  # seconds between wake-ups when idle: the windowed metrics decay to zero
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, Job | None]] = deque()
        self._in_flight = 0
        self._closing = False
        self._jobs: dict[int, tuple[Job, int]] = {}  # engine request id -> (job, prompt index)
        self._live: list[Job] = []
        self._thread = threading.Thread(target=self._run, name="decodekit-engine", daemon=True)

    # ---- the loop's side (any thread) ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
            if self._in_flight >= self.max_in_flight:
                raise QueueFull()
            self._in_flight += 1
            self.metrics.in_flight.set(self._in_flight)
            self._inbox.append(("add", job))
            self._cond.notify()

    def cancel(self, job: Job) -> None:
        """The client is gone: abort the job's sequences (their KV memory returns at the next engine iteration)."""
        with self._cond:
            self._inbox.append(("cancel", job))
            self._cond.notify()

    def stop(self, timeout: float = 30.0) -> None:
        """Fail whatever is still in flight and end the engine thread."""
        with self._cond:
            self._closing = True
            self._inbox.append(("stop", None))
            self._cond.notify()
        self._thread.join(timeout)

    # ---- the engine thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._inbox and not self.engine.core.has_work():
                    self._cond.wait(self.idle_wake)
                messages = list(self._inbox)
                self._inbox.clear()
            try:
                if not self._iterate(messages):
                    return
            except Exception:  # noqa: BLE001 - a bug must not take the server down with it
                log.exception("the engine thread failed; failing the requests in flight")
                for job in list(self._live):
                    error = APIError(500, "internal error in the engine", type="server_error")
                    try:
                        self._fail(job, error, outcome="error")
                    except Exception:  # noqa: BLE001 - the engine's state is broken: at least answer the client
                        self._send(job, [error])

    def _iterate(self, messages: list[tuple[str, Job | None]]) -> bool:
        """New jobs and cancellations, time limits, one engine step, its events; False once told to stop."""
        for kind, job in messages:
            if kind == "stop":
                for live in list(self._live):
                    self._fail(live, APIError(503, "the server shut down before this request finished",
                                              type="server_error", code="shutting_down"))
                return False
            if kind == "add":
                self._add(job)
            elif kind == "cancel" and not job.closed:
                self._close(job, "cancelled")
        now = time.perf_counter()
        for job in [j for j in self._live if now > j.deadline]:
            self._fail(job, APIError(408, f"the request ran past the server's time limit of {job.timeout:g} s",
                                     type="timeout_error", code="request_timeout",
                                     headers={"x-should-retry": "false"}), outcome="timeout")
        if self.engine.core.has_work():
            self._publish(self.engine.step())
        self._gauges()
        return True

    def _add(self, job: Job) -> None:
        work, engine = job.work, self.engine
        try:
            requests = [engine.make_request(p, work.max_new_tokens, chat=work.chat, **work.kwargs)
                        for p in work.prompts]
            engine.core.add_all(requests)
        except (ValueError, TemplateError) as e:  # the request's content: bad values, a template that refuses it
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            self._fail(job, APIError(400, message), outcome="invalid", live=False)
            return
        except Exception as e:  # noqa: BLE001 - a bug in building the request: 500, and keep serving
            log.exception("building a request failed")
            self._fail(job, APIError(500, f"internal error: {type(e).__name__}", type="server_error"),
                       outcome="error", live=False)
            return
        job.requests = requests
        for i, r in enumerate(requests):
            self._jobs[r.id] = (job, i)
            self.metrics.prompt_tokens.inc(len(r.prompt_ids))
        self._live.append(job)
        self._send(job, [Accepted()])

    def _publish(self, updated: list) -> None:
        batches: dict[int, tuple[Job, list]] = {}
        tokens = decode_tokens = decode_steps = 0
        for seq in updated:
            owner = self._jobs.get(seq.request.id)
            if owner is None:
                continue
            job, prompt_index = owner
            index = prompt_index * job.work.n + seq.index
            state = job.choices.setdefault(index, _Choice())
            new_tokens = len(seq.output) - state.tokens
            steps = seq.stats.decode_steps - state.decode_steps
            tokens += new_tokens
            if steps > 0:  # tokens of decode steps (the first token comes from the prompt's prefill)
                decode_tokens += new_tokens - (1 if state.tokens == 0 else 0)
                decode_steps += steps
            state.tokens, state.decode_steps = len(seq.output), seq.stats.decode_steps
            text = seq.stopper.text if seq.finished else seq.stopper.visible()
            delta = Delta(index, text[state.shown:], self._logprobs(seq, state),
                          seq.finish_reason if seq.finished else None)
            state.shown = len(text)
            if delta.text or delta.logprobs or delta.finish_reason:
                batches.setdefault(id(job), (job, []))[1].append(delta)
            if new_tokens and not job.first_token:
                job.first_token = True
                self.metrics.ttft.observe(time.perf_counter() - job.arrival)
        self.metrics.step(tokens, decode_tokens, decode_steps)
        for job, events in batches.values():
            if all(r.finished for r in job.requests):
                events.append(Done(sum(len(r.prompt_ids) for r in job.requests),
                                   sum(len(s.output) for r in job.requests for s in r.sequences)))
                self._close(job, "finished", abort=False)
            self._send(job, events)

    def _logprobs(self, seq, state: _Choice) -> list[TokenLogprob] | None:
        if seq.top_logprobs is None:
            return None
        new = seq.logprobs[state.logprobs:len(seq.output)]
        start = state.logprobs
        state.logprobs += len(new)
        piece = self.engine.tokenizer.decode
        return [TokenLogprob(piece([seq.output[start + i]]), lp, [(piece([t]), v) for t, v in alts])
                for i, (lp, alts) in enumerate(new)]

    def _close(self, job: Job, outcome: str, abort: bool = True, live: bool = True) -> None:
        """No more events for this job: its place in the queue frees up, its sequences (if still running) abort."""
        if job.closed:
            return
        job.closed = True
        if live and job in self._live:
            self._live.remove(job)
        with self._cond:
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
        self.metrics.requests.labels(outcome).inc()
        for r in job.requests:
            self._jobs.pop(r.id, None)
            self.engine.core.requests.pop(r.id, None)
            if abort and not r.finished:
                self.engine.core.abort(r)

    def _fail(self, job: Job, error: APIError, outcome: str = "error", live: bool = True) -> None:
        self._close(job, outcome, live=live)
        self._send(job, [error])

    def _send(self, job: Job, events: list) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, events)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def _gauges(self) -> None:
        sched, alloc = self.engine.core.scheduler, self.engine.core.pool.allocator
        with self._cond:
            queued = sum(1 for kind, _ in self._inbox if kind == "add")
        self.metrics.waiting.set(len(sched.waiting) + queued)
        self.metrics.running.set(len(sched.running))
        self.metrics.kv_used.set(alloc.capacity - alloc.num_free)
        self.metrics.kv_total.set(alloc.capacity)
        self.metrics.refresh()
