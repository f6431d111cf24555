"""Attention sinks plus a recent window: keep the first `n_sink` tokens and the most recent ones.

Xiao et al., "Efficient Streaming Language Models with Attention Sinks" (ICLR 2024, arXiv 2309.17453). The budget
`n_keep` (from the compression ratio) holds `n_sink` sinks and a window of the `n_keep - n_sink` latest tokens.
Kept keys keep their original positions (no re-rotation), as kvpress's StreamingLLMPress without KeyRerotation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PROTECTED, LayerKV, ScorerPress, register


@register
@dataclass
class StreamingLLMPress(ScorerPress):
    name = "streaming_llm"
    n_sink: int = 4  # first tokens always kept: attention sinks

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_sink < 0:
            raise ValueError(f"n_sink must be >= 0, got {self.n_sink}")

    def score(self, kv: LayerKV, n_keep: int) -> torch.Tensor:
        # Recency (the index) ranks the window; sinks sit above everything.
        scores = torch.arange(kv.length, dtype=torch.float64, device=kv.keys.device)
        scores[: self.n_sink] += PROTECTED
        return scores.expand(kv.keys.shape[0], -1)
