"""Key-norm eviction: keep the tokens whose keys have the LOWEST L2 norm.

Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression" (EMNLP 2024,
arXiv 2406.11430): keys with a low norm draw high attention, so the score is `-||k||` (as kvpress's KnormPress).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import LayerKV, ScorerPress, register


@register
@dataclass
class KnormPress(ScorerPress):
    name = "knorm"

    def score(self, kv: LayerKV, n_keep: int) -> torch.Tensor:
        return -kv.keys.float().norm(dim=-1)
