"""MagicDec: self-speculation with a StreamingLLM draft cache.

Chen et al., "MagicDec: Breaking the Latency-Throughput Tradeoff for Long Context Generation with Speculative
Decoding" (arXiv 2408.11049). For long contexts (and large batches) decoding is bound by reading the KV cache, so
the target itself, attending over a small sparse cache, is a draft that is both cheap and well aligned: MagicDec
drafts with a StreamingLLM cache (attention sinks plus a recent window of fixed size) and verifies with the full
cache. The window slides as the output grows (the cache is pressed again every `compress_every` tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..kv.paged.eviction import EvictionState
from ..kv.presses.streaming_llm import StreamingLLMPress
from .base import register
from .compressed import CompressedDrafter


@register
@dataclass
class MagicDec(CompressedDrafter):
    """Knobs (defaults): `budget` (512: KV entries of the draft cache), `n_sink` (4: attention sinks among them),
    `num_draft` (4: max chain length), `stop_threshold` (0.0: stop drafting when path probability x top-1
    probability falls under it), `compress_every` (32: slide the window every this many new tokens)."""

    name = "magicdec"
    budget: int = 512
    n_sink: int = 4
    num_draft: int = 4
    stop_threshold: float = 0.0
    compress_every: int = 32

    def __post_init__(self) -> None:
        if self.budget < 1 or self.n_sink < 0 or self.compress_every < 1:
            raise ValueError("magicdec: budget and compress_every must be >= 1, n_sink >= 0")
        self._setup()

    def _state(self, prompt_len: int) -> EvictionState:
        return EvictionState(StreamingLLMPress(n_sink=self.n_sink), self.net, prompt_len, 0.0, self.compress_every,
                             budget=self.budget)
