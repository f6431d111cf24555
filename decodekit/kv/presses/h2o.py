"""Heavy hitters plus a recent window: keep the tokens with the most accumulated attention, and the latest ones.

Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models" (NeurIPS 2023,
arXiv 2306.14048). The engine accumulates, per key head, the attention each key has received from every query so
far (`accumulate_attention`, once per step); the press keeps `recent_ratio` of its budget as the most recent tokens
and fills the rest with the heaviest hitters (the paper splits the budget half and half).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import LayerKV, ScorerPress, protect_last, register


def accumulate_attention(acc: torch.Tensor | None, weights: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """The accumulator `[H_kv, L]` after one step's attention `weights` `[H_q, T, L]` (softmax rows).

    `acc` covers the L' <= L keys that existed before the step (None = empty); new keys start at zero. Attention is
    summed over the step's T queries and the query heads that share a key head.
    """
    h_q, _, n = weights.shape
    if h_q % num_kv_heads:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({num_kv_heads})")
    step = weights.float().sum(dim=1).reshape(num_kv_heads, h_q // num_kv_heads, n).sum(dim=1)
    if acc is None:
        return step
    if acc.shape[0] != num_kv_heads or acc.shape[1] > n:
        raise ValueError(f"accumulator {tuple(acc.shape)} does not fit a step over {n} keys and {num_kv_heads} heads")
    step[:, : acc.shape[1]] += acc.float()
    return step


@register
@dataclass
class H2OPress(ScorerPress):
    name = "h2o"
    recent_ratio: float = 0.5  # fraction of the kept budget reserved for the most recent tokens

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.recent_ratio <= 1.0:
            raise ValueError(f"recent_ratio must be in [0, 1], got {self.recent_ratio}")

    def n_recent(self, n_keep: int) -> int:
        return round(self.recent_ratio * n_keep)

    def score(self, kv: LayerKV, n_keep: int) -> torch.Tensor:
        mass = kv.need("attn_mass", self.name).float()
        return protect_last(mass, self.n_recent(n_keep))
