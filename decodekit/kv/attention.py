"""Attention arithmetic the presses share: plain softmax attention with grouped-query heads, in float32."""
from __future__ import annotations

import math

import torch


def groups_of(queries: torch.Tensor, keys: torch.Tensor) -> int:
    """Query heads per key head (GQA), or a one-line error."""
    h_q, h_kv = queries.shape[0], keys.shape[0]
    if h_q % h_kv:
        raise ValueError(f"query heads ({h_q}) must be a multiple of key/value heads ({h_kv})")
    return h_q // h_kv


def expand_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """`[H_kv, ...]` -> `[H_kv * groups, ...]`: query head h reads key head h // groups."""
    return x.repeat_interleave(groups, dim=0)


def group_mean(x: torch.Tensor, h_kv: int) -> torch.Tensor:
    """`[H_q, ...]` -> `[H_kv, ...]`: mean over the query heads that share a key head."""
    return x.reshape(h_kv, x.shape[0] // h_kv, *x.shape[1:]).mean(dim=1)


def logits(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`[H_q, T, D] x [H_kv, L, D] -> [H_q, T, L]` scaled dot products in float32."""
    scale = 1.0 / math.sqrt(keys.shape[-1]) if scale is None else scale
    k = expand_kv(keys.float(), groups_of(queries, keys))
    return torch.matmul(queries.float(), k.transpose(-1, -2)) * scale


def window_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Softmax attention `[H_q, W, L]` of the last W tokens' queries over all L keys, causal within the window.

    Query w is the token at index L - W + w, so it sees keys 0 .. L - W + w.
    """
    w, n = queries.shape[1], keys.shape[1]
    s = logits(queries, keys, scale)
    future = torch.arange(n, device=s.device)[None, :] > (n - w + torch.arange(w, device=s.device))[:, None]
    return s.masked_fill(future, float("-inf")).softmax(dim=-1)


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None,
           scale: float | None = None) -> torch.Tensor:
    """`[H_q, T, D]` outputs of softmax attention; `mask` (broadcast to `[H_q, T, L]`, True = visible)."""
    s = logits(queries, keys, scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    v = expand_kv(values.float(), groups_of(queries, keys))
    return torch.matmul(s.softmax(dim=-1), v).to(values.dtype)


def attend_selected(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
                    scale: float | None = None) -> torch.Tensor:
    """`[H_q, T, D]` attention of each query head over only its own tokens `indices` (`[H_q, k]`)."""
    groups = groups_of(queries, keys)
    if indices.dim() != 2 or indices.shape[0] != queries.shape[0]:
        raise ValueError(f"indices must be [H_q, k] = [{queries.shape[0]}, k], got {tuple(indices.shape)}")
    idx = indices[..., None].expand(-1, -1, keys.shape[-1])
    k = expand_kv(keys, groups).gather(1, idx)
    v = expand_kv(values, groups).gather(1, idx)
    return attend(queries, k, v, scale=scale)
