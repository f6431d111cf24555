"""Quest: query-aware page selection. Each page of keys keeps its channel-wise min and max; a query's dot product
with any key of the page is at most sum_d max(q_d * min_d, q_d * max_d); each head reads only its top pages.

Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference" (ICML 2024, arXiv 2406.10774).
Pages are `page_size` consecutive slots (the last one may be partial: its min/max cover only real tokens); each
query head attends to the `ceil(token_budget / page_size)` pages with the highest bound. With several queries in a
step a page's bound is the largest over them. Nothing is evicted: this decides what a decode step reads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import attend, expand_kv, groups_of
from ..base import Press, register


@register
@dataclass
class QuestPress(Press):
    name = "quest"
    page_size: int = 16
    token_budget: int = 256  # tokens read per head: ceil(token_budget / page_size) pages
    scale: float | None = None  # attention scale; None = 1/sqrt(head_dim)

    def __post_init__(self) -> None:
        if self.page_size < 1 or self.token_budget < 1:
            raise ValueError(f"page_size and token_budget must be >= 1, got {self.page_size}, {self.token_budget}")

    def page_metadata(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Channel-wise min and max of every page, `[H_kv, n_pages, D]` each (float32)."""
        h, n, d = keys.shape
        pad = (-n) % self.page_size
        k = keys.float()
        lo = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("inf")).reshape(h, -1, self.page_size, d)
        hi = torch.nn.functional.pad(k, (0, 0, 0, pad), value=float("-inf")).reshape(h, -1, self.page_size, d)
        return lo.amin(dim=2), hi.amax(dim=2)

    def upper_bounds(self, queries: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
        """`[H_q, n_pages]`: for each head and page, an upper bound of q . k over the page's keys (unscaled)."""
        groups = groups_of(queries, kmin)
        lo, hi = expand_kv(kmin, groups)[:, None], expand_kv(kmax, groups)[:, None]  # [H_q, 1, P, D]
        q = queries.float()[:, :, None]  # [H_q, T, 1, D]
        return torch.maximum(q * lo, q * hi).sum(dim=-1).amax(dim=1)

    def select(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Sorted page ids `[H_q, n]`: each head's pages with the highest bounds."""
        bounds = self.upper_bounds(queries, *self.page_metadata(keys))
        n = min(math.ceil(self.token_budget / self.page_size), bounds.shape[-1])
        return bounds.topk(n, dim=-1).indices.sort(dim=-1).values

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               pages: torch.Tensor) -> torch.Tensor:
        """`[H_q, T, D]` attention of each head over the tokens of its selected pages."""
        n = keys.shape[1]
        n_pages = math.ceil(n / self.page_size)
        chosen = torch.zeros(queries.shape[0], n_pages, dtype=torch.bool, device=keys.device)
        chosen.scatter_(1, pages, True)
        visible = chosen.repeat_interleave(self.page_size, dim=1)[:, :n]
        return attend(queries, keys, values, visible[:, None], self.scale)
