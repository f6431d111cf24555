"""TriForce-style self-speculation: the target drafts over a query-aware selection of its own KV cache.

Sun et al., "TriForce: Lossless Acceleration of Long Sequence Generation with Hierarchical Speculative Decoding"
(arXiv 2404.11912). TriForce drafts with the target's weights over a small *retrieval* cache: the context's KV
chunks most relevant to the current queries, chosen once and kept, which reads a fraction of the full cache and is
accepted far more often than a StreamingLLM window on retrieval-heavy text; the full cache verifies. Here the
selection is SnapKV's (the prompt's last `window_size` queries vote, through their attention, for the tokens to
keep; Li et al. 2024), a per-token form of the same query-aware retrieval, to a budget of `budget` entries; tokens
generated after it are all kept. Not implemented: TriForce's second level (a small model drafting for this
draft).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..kv.paged.eviction import EvictionState
from ..kv.presses.snapkv import SnapKVPress
from .base import register
from .compressed import CompressedDrafter


@register
@dataclass
class TriForce(CompressedDrafter):
    """Knobs (defaults): `budget` (512: KV entries the draft keeps of the context), `window_size` (64: prompt
    queries that choose them), `kernel_size` (5: SnapKV's pooling), `num_draft` (4: max chain length),
    `stop_threshold` (0.0: stop drafting when path probability x top-1 probability falls under it)."""

    name = "triforce"
    budget: int = 512
    window_size: int = 64
    kernel_size: int = 5
    num_draft: int = 4
    stop_threshold: float = 0.0

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"triforce: budget must be >= 1, got {self.budget}")
        SnapKVPress(kernel_size=self.kernel_size, window_size=self.window_size)  # validates both
        self._setup()

    def _state(self, prompt_len: int) -> EvictionState:
        press = SnapKVPress(kernel_size=self.kernel_size, window_size=self.window_size, scale=self.net.config.scale)
        return EvictionState(press, self.net, prompt_len, 0.0, 0, budget=self.budget)
