"""MagicDec: self-speculation with a StreamingLLM draft cache.

Chen et al., "MagicDec: Breaking the Latency-Throughput Tradeoff for Long Context Generation with Speculative
Decoding" (arXiv 2408.11049). For long contexts (and large batches) decoding is bound by reading the KV cache, so
the target itself, attending over a small sparse cache, is a draft that is both cheap and well aligned: MagicDec
drafts with a StreamingLLM cache (attention sinks plus a recent window of fixed size) and verifies with the full
cache. The window slides as the output grows (the cache is pressed again every `compress_every` tokens).

In fused draft rounds on a GPU (greedy sequences, `on_device`) there is no second cache: the draft is the target
reading a StreamingLLM view of its *own* cache (`StaticDraftRounds.window_chain`: the first `n_sink` entries and the
last `budget - n_sink` before the root, the window sliding every token), so nothing is copied, fed or pressed, and
the kept entries hold the full-context keys and values the verify passes wrote. Draft, verify and commit run on the
device, several rounds per host visit. Elsewhere (sampling, the CPU's eager runner) the draft keeps its own pressed
cache, as above.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kv.paged.eviction import EvictionState
from ..kv.presses.streaming_llm import StreamingLLMPress
from .base import register
from .compressed import CompressedDrafter


@register
@dataclass
class MagicDec(CompressedDrafter):
    """Knobs (defaults): `budget` (512: KV entries of the draft cache), `n_sink` (4: attention sinks among them),
    `num_draft` (4: max chain length), `stop_threshold` (0.0: stop drafting when path probability x top-1
    probability falls under it), `compress_every` (32: slide the window every this many new tokens), `on_device`
    (True: greedy sequences on a GPU draft over a view of the target's cache inside fused draft rounds; a
    `stop_threshold` above 0 keeps them on the host)."""

    name = "magicdec"
    history_tokens = 1  # on the device it drafts from the root alone (the rest is the target's cache)
    budget: int = 512
    n_sink: int = 4
    num_draft: int = 4
    stop_threshold: float = 0.0
    compress_every: int = 32
    on_device: bool = True

    def __post_init__(self) -> None:
        if self.budget < 1 or self.n_sink < 0 or self.compress_every < 1:
            raise ValueError("magicdec: budget and compress_every must be >= 1, n_sink >= 0")
        self._setup()

    def _state(self, prompt_len: int) -> EvictionState:
        return EvictionState(StreamingLLMPress(n_sink=self.n_sink), self.net, prompt_len, 0.0, self.compress_every,
                             budget=self.budget)

    @property
    def drafts_on_device(self) -> bool:
        return self.on_device and self.stop_threshold == 0.0

    def propose_on_device(self, history: torch.Tensor, length: torch.Tensor, depth: int,
                          rounds=None) -> tuple[torch.Tensor, torch.Tensor]:
        steps = min(depth, self.num_draft)
        sink = min(self.n_sink, self.budget)
        draft = rounds.window_chain(steps, sink, self.budget - sink)
        draft = torch.nn.functional.pad(draft, (0, depth - steps))
        return draft, torch.full_like(length, steps)
