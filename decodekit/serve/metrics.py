"""The server's Prometheus metrics, in a registry of their own (one per app, no global state).

The engine thread sets them as it steps; `GET /metrics` renders them in Prometheus' text format. Rates over the
last `window` seconds (tokens/s, mean tokens per decode step) are kept as gauges beside the raw counters, so a plain
scrape shows them and a Prometheus server can still compute its own with `rate()`.
"""
from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, window: float = 10.0) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.waiting = Gauge("decodekit_queue_length", "requests and sequences waiting to run", registry=r)
        self.running = Gauge("decodekit_running_sequences", "sequences in the running batch", registry=r)
        self.in_flight = Gauge("decodekit_requests_in_flight", "HTTP requests accepted and not finished",
                               registry=r)
        self.kv_used = Gauge("decodekit_kv_blocks_used", "KV-cache blocks held by sequences", registry=r)
        self.kv_total = Gauge("decodekit_kv_blocks_total", "KV-cache blocks in the pool", registry=r)
        self.tokens_per_s = Gauge("decodekit_tokens_per_second",
                                  f"generated tokens per second over the last {window:g} s", registry=r)
        self.tokens_per_step = Gauge("decodekit_mean_tokens_per_step",
                                     f"mean tokens committed per decode step (accepted draft tokens + 1) over the "
                                     f"last {window:g} s", registry=r)
        self.prompt_tokens = Counter("decodekit_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated = Counter("decodekit_generation_tokens", "generated tokens", registry=r)
        self.decode_steps = Counter("decodekit_decode_steps", "decode steps summed over sequences", registry=r)
        self.requests = Counter("decodekit_requests", "finished HTTP requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("decodekit_time_to_first_token_seconds", "from arrival to the first token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.window = window
        self._recent: deque[tuple[float, int, int, int]] = deque()  # (time, tokens, decode tokens, decode steps)
        self._sums = [0, 0, 0]  # of the entries in _recent

    def step(self, tokens: int, decode_tokens: int, decode_steps: int) -> None:
        """What one engine step produced: all new tokens, and those of decode steps with how many steps they took."""
        if not (tokens or decode_steps):
            return
        self.generated.inc(tokens)
        self.decode_steps.inc(decode_steps)
        self._recent.append((time.perf_counter(), tokens, decode_tokens, decode_steps))
        for i, v in enumerate((tokens, decode_tokens, decode_steps)):
            self._sums[i] += v

    def refresh(self) -> None:
        """Recompute the windowed rates (also when idle, so they fall to zero)."""
        now = time.perf_counter()
        while self._recent and self._recent[0][0] < now - self.window:
            _, *old = self._recent.popleft()
            for i, v in enumerate(old):
                self._sums[i] -= v
        tokens, decode_tokens, steps = self._sums
        self.tokens_per_s.set(tokens / self.window)
        self.tokens_per_step.set(decode_tokens / steps if steps else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
