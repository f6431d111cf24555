"""EMS: head-wise evict-then-merge under a Global-Local importance score.

Li et al., "EMS: Adaptive Evict-then-Merge Strategy for Head-wise KV Cache Compression Based on Global-Local
Importance" (arXiv 2412.08521). Two parts:

1. Global-Local score. Accumulated attention (global) favours early tokens, because under the causal mask they
   have been seen by more queries; the attention of the last tokens (local) favours recent ones. EMS combines both.
   Here: global = accumulated attention mass divided by the number of queries that could see the key
   (`last position + 1 - position`: the causal-mask bias removed), local = the observation window's attention
   averaged over its queries (as SnapKV, without pooling); each is normalised to sum to 1 per head, and the score
   is their element-wise maximum (a token matters if either view says so). The paper's abstract-level description
   is what this follows; the max is our choice of combination (knob-free, scale-free), documented as such.
2. Evict-then-merge, head-wise. Each head keeps its own top `n_keep` tokens by that score; they are the class
   centres. Every evicted token joins the centre whose key is most similar (cosine) if that similarity is at least
   `merge_threshold`, else the zero class, whose members are simply dropped. Each centre's key and value become the
   score-weighted mean of itself and its members. Heads with redundant tokens merge much; sparse heads mostly evict:
   the adaptivity is per head. The zero class makes every head the same tensor operation (one `scatter_add`),
   which is what the paper's head-wise parallel compression relies on.

Output is head-wise (`HeadwiseKV`: each head its own `[n_keep]` tokens, keys, values, positions). A paged cache with
one slot per token takes `select()` (the base's shared choice by mean score) or `reduce_headwise` on
`select_headwise()`, and then gets eviction without the merge. Tests cover the score, the head-wise selection, the
merge (against a per-token loop) and the reducer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..attention import group_mean, window_attention
from ..base import LayerKV, ScorerPress, register


@dataclass
class HeadwiseKV:
    """Each head's own tokens: indices, keys, values `[H_kv, n, D]`, positions `[H_kv, n]`."""

    indices: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor


def global_local_scores(kv: LayerKV, scale: float | None = None) -> torch.Tensor:
    """`[H_kv, L]`: max of the normalised debiased global score and the normalised local-window score."""
    mass = kv.need("attn_mass", "ems").double()
    queries = kv.need("queries", "ems")
    seen = (kv.positions.max() + 1 - kv.positions).clamp_min(1).double()  # queries that could attend each key
    glob = mass / seen
    local = group_mean(window_attention(queries, kv.keys, scale).mean(dim=1), kv.keys.shape[0]).double()
    glob = glob / glob.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    local = local / local.sum(dim=-1, keepdim=True).clamp_min(1e-300)
    return torch.maximum(glob, local)


@register
@dataclass
class EMSPress(ScorerPress):
    name = "ems"
    merge_threshold: float = 0.8  # cosine similarity of keys at which an evicted token merges into a kept one
    scale: float | None = None  # attention scale; None = 1/sqrt(head_dim)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1.0 <= self.merge_threshold <= 1.0:
            raise ValueError(f"merge_threshold is a cosine similarity in [-1, 1], got {self.merge_threshold}")

    def score(self, kv: LayerKV, n_keep: int) -> torch.Tensor:
        return global_local_scores(kv, self.scale)

    def compress_headwise(self, kv: LayerKV) -> HeadwiseKV:
        n_keep = self.n_keep(kv.length)
        h, n, d = kv.keys.shape
        if n_keep >= n:
            idx = torch.arange(n, device=kv.keys.device).expand(h, -1)
            return HeadwiseKV(idx, kv.keys, kv.values, kv.positions.expand(h, -1))
        scores = self.score(kv, n_keep)
        kept = scores.topk(n_keep, dim=-1).indices.sort(dim=-1).values  # [H, n_keep]
        evicted_mask = torch.ones(h, n, dtype=torch.bool, device=kv.keys.device)
        evicted_mask.scatter_(1, kept, False)
        evicted = evicted_mask.nonzero()[:, 1].reshape(h, n - n_keep)  # row-major: each head's evicted, ascending

        def take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))

        keys, values = kv.keys.double(), kv.values.double()
        centre_k, centre_v = take(keys, kept), take(values, kept)
        member_k, member_v = take(keys, evicted), take(values, evicted)
        sim = F.normalize(member_k, dim=-1) @ F.normalize(centre_k, dim=-1).transpose(1, 2)  # [H, n_ev, n_keep]
        best_sim, best = sim.max(dim=-1)
        cls = torch.where(best_sim >= self.merge_threshold, best + 1, 0)  # class 0 = the zero class: dropped
        w_centre, w_member = scores.gather(1, kept), scores.gather(1, evicted)
        weight = torch.zeros(h, n_keep + 1, dtype=torch.float64, device=keys.device)
        weight[:, 1:] = w_centre
        weight.scatter_add_(1, cls, w_member)
        acc_k = F.pad(centre_k * w_centre[..., None], (0, 0, 1, 0))
        acc_v = F.pad(centre_v * w_centre[..., None], (0, 0, 1, 0))
        acc_k.scatter_add_(1, cls[..., None].expand(-1, -1, d), member_k * w_member[..., None])
        acc_v.scatter_add_(1, cls[..., None].expand(-1, -1, d), member_v * w_member[..., None])
        # A centre whose weights are all zero (no attention at all) keeps its own vector.
        denom = weight[:, 1:, None]
        merged_k = torch.where(denom > 0, acc_k[:, 1:] / denom.clamp_min(1e-300), centre_k)
        merged_v = torch.where(denom > 0, acc_v[:, 1:] / denom.clamp_min(1e-300), centre_v)
        return HeadwiseKV(kept, merged_k.to(kv.keys.dtype), merged_v.to(kv.values.dtype), kv.positions[kept])
