"""SnapKV: the prompt's last tokens (an observation window) vote, through their attention, for the tokens to keep.

Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation" (NeurIPS 2024, arXiv 2404.14469). At
prefill, the W window queries attend to all keys (causally); each earlier key's score is its attention averaged over
the window's queries, smoothed by 1-D average pooling (kernel `kernel_size`, zero padding counted, as
`F.avg_pool1d`), then averaged over the query heads of its key head (GQA). The window itself is always kept.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..attention import group_mean, window_attention
from ..base import LayerKV, ScorerPress, protect_last, register


def snapkv_scores(queries: torch.Tensor, keys: torch.Tensor, kernel_size: int,
                  scale: float | None = None) -> torch.Tensor:
    """`[H_kv, L - W]` pooled window-attention scores of the keys before the window."""
    w = queries.shape[1]
    attn = window_attention(queries, keys, scale)[..., : keys.shape[1] - w].mean(dim=1)  # [H_q, L - W]
    pooled = F.avg_pool1d(attn[:, None], kernel_size, stride=1, padding=kernel_size // 2)[:, 0]
    return group_mean(pooled, keys.shape[0])


@register
@dataclass
class SnapKVPress(ScorerPress):
    name = "snapkv"
    kernel_size: int = 5  # pooling kernel (odd): neighbours of a voted token share its vote
    scale: float | None = None  # attention scale; None = 1/sqrt(head_dim)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd number, got {self.kernel_size}")

    def score(self, kv: LayerKV, n_keep: int) -> torch.Tensor:
        queries = kv.need("queries", self.name)
        w = queries.shape[1]
        scores = torch.zeros(kv.keys.shape[:2], device=kv.keys.device)
        scores[:, : kv.length - w] = snapkv_scores(queries, kv.keys, self.kernel_size, self.scale)
        return protect_last(scores, w)
