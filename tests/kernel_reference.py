"""The Triton attention kernels' semantics in torch (masked attention over gathered keys and values): what the kernel
tests compare against, and what engine tests run in the kernels' place on the CPU (`use_references`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from decodekit.models import kernels


def paged_decode_reference(q, k_store, v_store, table, lo, hi, scale):
    idx = torch.arange(table.shape[1], device=q.device)
    mask = (idx >= lo[:, None]) & (idx < hi[:, None])
    keys, values = k_store[table].transpose(1, 2), v_store[table].transpose(1, 2)
    return F.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask[:, None, None], scale=scale,
                                          enable_gqa=True)[:, :, 0]


def paged_tree_reference(q, k_store, v_store, table, lo, ctx, tree, scale):
    rows, length = table.shape
    width = q.shape[0] // rows
    if tree is None:
        tree = torch.ones(width, width, dtype=torch.bool, device=q.device).tril().expand(rows, width, width)
    if lo is None:
        lo = torch.zeros_like(ctx)
    lo = lo.view(rows, -1)  # [rows, 1] or one per query [rows, width]
    rel = torch.arange(length, device=q.device)[None] - ctx[:, None]  # [rows, L]
    committed = (rel < 0)[:, None] & ((rel + ctx[:, None])[:, None] >= lo[:, :, None])  # [rows, 1 or width, L]
    new = (rel >= 0) & (rel < width)
    ancestor = tree.gather(2, rel.clamp(0, width - 1)[:, None].expand(rows, width, length))
    mask = committed | (new[:, None] & ancestor)  # [rows, width, L]
    keys, values = k_store[table].transpose(1, 2), v_store[table].transpose(1, 2)
    qg = q.view(rows, width, *q.shape[1:]).transpose(1, 2)
    out = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mask[:, None], scale=scale, enable_gqa=True)
    return out.transpose(1, 2).reshape(q.shape)


def use_references(m) -> list[tuple[str, int]]:
    """On `m` (a monkeypatch context): the kernels' paths taken on the CPU, with the references in the kernels'
    place. Returns the list each call appends (kernel name, table width) to."""
    calls = []

    def recorded(name, fn):
        def run(q, k_store, v_store, table, *rest):
            calls.append((name, table.shape[1]))
            return fn(q, k_store, v_store, table, *rest)
        return run

    m.setattr(kernels, "available", lambda q: True)
    m.setattr(kernels, "TREE_MAX_WIDTH", kernels.TREE_WIDEST)  # the tree kernel's path on (off by default)
    m.setattr(kernels, "paged_decode", recorded("decode", paged_decode_reference))
    m.setattr(kernels, "paged_tree", recorded("tree", paged_tree_reference))
    return calls
