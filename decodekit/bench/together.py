"""A batch that decodes together: every prompt is prefilled first, then all B sequences decode side by side.

Left to itself the core decodes a sequence as soon as its prompt is in, while later prompts still prefill (what a
server wants); a benchmark of "batch B at context L" then measures a batch that grows and shrinks. Here a sequence
whose prompt is in waits (`Sequence.paused`, as a search policy holds a hypothesis back) until every prompt is in,
and only the decode phase that follows is timed, synchronized with the device.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch


@dataclass
class Together:
    results: list  # one GenerationResult per prompt, in order
    prefill_s: float  # until every prompt's first token
    decode_s: float  # from there until every sequence finished
    decoded: int  # tokens made in the decode phase (the first token of each sequence excluded)

    @property
    def decode_tok_s(self) -> float:
        return self.decoded / self.decode_s if self.decode_s else 0.0


def decode_together(engine, prompts: list, max_new_tokens: int, around_decode=contextlib.nullcontext,
                    **options) -> Together:
    """Run `prompts` (with `engine.add_request` options) as one batch that decodes together; `around_decode()` is
    entered for the decode phase only (a profiler)."""
    sync = torch.cuda.synchronize if engine.model.device.type == "cuda" else (lambda: None)
    requests = [engine.add_request(p, max_new_tokens, **options) for p in prompts]
    seqs = [s for r in requests for s in r.sequences]
    t0 = time.perf_counter()
    try:
        while any(not s.output and not s.finished for s in seqs):
            engine.step()
            for s in seqs:
                s.paused = bool(s.output) and not s.finished
    except BaseException:
        for r in requests:
            engine.core.abort(r)
        raise
    for s in seqs:
        s.paused = False
    sync()
    prefill_s, made = time.perf_counter() - t0, sum(len(s.output) for s in seqs)
    with around_decode():
        t0 = time.perf_counter()
        engine._run_until(requests)  # generate's own loop (aborts the requests if a step fails)
        sync()
        decode_s = time.perf_counter() - t0
    results = [r.sequences[0].result() for r in requests]
    for r in requests:
        engine.core.requests.pop(r.id, None)
    return Together(results, prefill_s, decode_s, sum(len(s.output) for s in seqs) - made)
