"""Paged decode attention in Triton (flash-decoding over the KV pool's slot table), for single-token passes.

Each row's query heads attend to the entries [lo, hi) of its slot table, read straight from the pool: no gathered
copy of the keys and values, the query heads of one KV head together (grouped-query attention), the entries split
into chunks scored in parallel and combined by their softmax statistics (flash-decoding), so one long row fills
the GPU too. Registered as a custom op, so torch.compile'd blocks call it and CUDA graphs capture it.
The CPU (and anything without Triton) uses the masked attention of `transformer.py`.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - no Triton: the reference attention runs
    triton = None

SPLIT = 128  # entries scored by one program
BLOCK_N = 64  # entries per tile inside a program


def available(q: torch.Tensor) -> bool:
    return triton is not None and q.is_cuda


if triton is not None:
    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lo_ptr, hi_ptr, acc_ptr, stat_ptr, scale,
                      stride_qb, stride_qh, stride_ks, stride_kh, stride_tb,
                      n_splits, length, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                      SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_kv = tl.num_programs(1)
        lo, hi = tl.load(lo_ptr + b), tl.load(hi_ptr + b)
        g, d = tl.arange(0, BLOCK_G), tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=g[:, None] < G,
                    other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        for start in range(s * SPLIT, s * SPLIT + SPLIT, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            live = (n >= lo) & (n < hi) & (n < length)
            slot = tl.load(table_ptr + b * stride_tb + n, mask=live, other=0)
            k = tl.load(k_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=live[:, None], other=0.0)
            v = tl.load(v_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=live[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
            scores = tl.where(live[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with nothing live adds nothing
            p = tl.exp(scores - safe[:, None])
            alpha = tl.exp(m - safe)
            total = total * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
            m = m_new
        row = (b * n_kv + h) * n_splits + s
        tl.store(acc_ptr + (row * BLOCK_G + g)[:, None] * D + d[None, :], acc)
        tl.store(stat_ptr + (row * BLOCK_G + g) * 2, m)
        tl.store(stat_ptr + (row * BLOCK_G + g) * 2 + 1, total)


    @triton.jit
    def _combine_kernel(acc_ptr, stat_ptr, out_ptr, n_splits, G: tl.constexpr, BLOCK_G: tl.constexpr,
                        GP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
        """Merge one (row, KV head)'s splits by their softmax statistics into `out` `[G, D]`."""
        b, h = tl.program_id(0), tl.program_id(1)
        n_kv = tl.num_programs(1)
        s, g, d = tl.arange(0, BLOCK_S), tl.arange(0, GP), tl.arange(0, D)
        base = (b * n_kv + h) * n_splits
        m_all = tl.load(stat_ptr + ((base + s)[:, None] * BLOCK_G + g[None, :]) * 2,
                        mask=(s < n_splits)[:, None] & (g < G)[None, :], other=float("-inf"))
        best = tl.max(m_all, 0)  # [GP]
        best = tl.where(best == float("-inf"), 0.0, best)
        norm = tl.zeros([GP], tl.float32)
        out = tl.zeros([GP, D], tl.float32)
        for i in range(0, n_splits):
            row = (base + i) * BLOCK_G + g
            m = tl.load(stat_ptr + row * 2, mask=g < G, other=float("-inf"))
            weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - best))  # a split with nothing live adds 0
            norm += tl.load(stat_ptr + row * 2 + 1, mask=g < G, other=0.0) * weight
            out += tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=(g < G)[:, None], other=0.0) * weight[:, None]
        out = out / tl.where(norm == 0.0, 1.0, norm)[:, None]
        tl.store(out_ptr + ((b * n_kv + h) * G + g)[:, None] * D + d[None, :], out, mask=(g < G)[:, None])


@torch.library.custom_op("decodekit::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, table: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per row: `q` `[B, Hq, D]` over the pool `k_store`, `v_store` `[S, Hkv, D]` at the
    slots `table` `[B, L]`, entries [lo, hi) of each row; returns `[B, Hq, D]`."""
    rows, hq, dim = q.shape
    hkv, length = k_store.shape[1], table.shape[1]
    groups = hq // hkv
    block_g = max(16, triton.next_power_of_2(groups))  # tl.dot needs 16 rows
    n_splits = triton.cdiv(length, SPLIT)
    q = q.contiguous()
    table = table.contiguous()
    acc = torch.empty(rows * hkv * n_splits * block_g, dim, dtype=torch.float32, device=q.device)
    stat = torch.empty(rows * hkv * n_splits * block_g, 2, dtype=torch.float32, device=q.device)
    _split_kernel[(rows, hkv, n_splits)](
        q, k_store, v_store, table, lo, hi, acc, stat, scale, q.stride(0), q.stride(1), k_store.stride(0),
        k_store.stride(1), table.stride(0), n_splits, length, G=groups, BLOCK_G=block_g, D=dim, SPLIT=SPLIT,
        BLOCK_N=BLOCK_N, PRECISION="ieee" if q.dtype == torch.float32 else "tf32")  # float32: exact products
    out = torch.empty(rows, hq, dim, dtype=q.dtype, device=q.device)
    _combine_kernel[(rows, hkv)](acc, stat, out, n_splits, G=groups, BLOCK_G=block_g,
                                 GP=triton.next_power_of_2(groups), D=dim, BLOCK_S=triton.next_power_of_2(n_splits))
    return out


@paged_decode.register_fake
def _(q, k_store, v_store, table, lo, hi, scale):
    return torch.empty_like(q)
