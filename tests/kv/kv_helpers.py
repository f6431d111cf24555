"""Small random layers for press tests."""
from __future__ import annotations

import torch

from decodekit.kv import LayerKV


def layer(h_kv: int = 2, length: int = 12, d: int = 8, groups: int = 2, window: int = 3, seed: int = 0,
          dtype: torch.dtype = torch.float32) -> LayerKV:
    g = torch.Generator().manual_seed(seed)
    return LayerKV(
        keys=torch.randn(h_kv, length, d, generator=g).to(dtype),
        values=torch.randn(h_kv, length, d, generator=g).to(dtype),
        positions=torch.arange(length) * 3 + 5,  # not 0..L-1: positions must be carried, not recomputed
        queries=torch.randn(h_kv * groups, window, d, generator=g).to(dtype),
        attn_mass=torch.rand(h_kv, length, generator=g) * 10,
    )


def topk_set(values: list[float], k: int) -> set[int]:
    """Indices of the k largest values (by a plain sort)."""
    return set(sorted(range(len(values)), key=lambda i: -values[i])[:k])
