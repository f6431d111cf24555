"""Paged attention in Triton, reading keys and values in place from the KV pool through the slot table.

`paged_decode`: one query a row (decode steps), over the entries [lo, hi) of its table. `paged_tree`: `width`
queries a row (a root token and its draft tree, or a short prefill chunk), over the committed entries [lo, ctx) plus,
among the row's new entries [ctx, ctx + width), those its ancestor mask marks. Both: no gathered copy of the keys and
values, the query heads of one KV head together (grouped-query attention), the entries split into chunks scored in
parallel and combined by their softmax statistics (flash-decoding), so one long row fills the GPU too. Registered as
custom ops, so torch.compile'd blocks call them and CUDA graphs capture them.
The CPU (and anything without Triton) uses the masked attention of `transformer.py`.
"""
from __future__ import annotations

from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - no Triton: the reference attention runs
    triton = None

BLOCK_N = 64  # entries per tile inside a program
# Launch settings; `bench/attention_kernels.py` times the kernels under sweeps of them. The decode kernel keeps
# Triton's defaults (4 warps, 3 pipeline stages): on the H100 no setting was more than 4% faster at 32k entries.
DECODE_WARPS, DECODE_STAGES = 4, 3
# `paged_tree` for heads over 256 bytes (Gemma 3's 256-dim heads in bfloat16): tiles of 64 entries, 4 warps, 2 stages.
# H100, batch 32 / 64, 32k entries, widths 8 / 16: 1.28x / 1.58x / 1.24x / 1.63x faster than the earlier 32-entry
# tiles with 8 warps and 3 stages (docs/benchmarks.md). None: `tree_tiles`' choice for narrow heads.
TREE_WIDE_TILE = (64, 4, 2)  # entries a tile, warps, pipeline stages
TREE_WIDE_ROWS = 32  # (query, head) pairs a tile at most
TREE_WARPS: Optional[int] = None  # narrow heads: None = 4 warps under 4 KB of queries a tile, else 8
TREE_STAGES = 3  # narrow heads
# Widest row `paged_tree` serves (64: every captured verify pass, `engine/graphs.py`). Off (1) by default: on the H100
# (2026-11-24) it passes its tests and makes a verify replay 8-15% cheaper, but Spec-Bench end to end got no faster
# with it (docs/benchmarks.md); `bench/verify_cost.py` turns it on per path. Set 64 to use it. Fused draft rounds
# (`engine/graphs.py: StaticDraftRounds`) use it whatever this says (`Rows.tree_kernel`): there it pays.
TREE_MAX_WIDTH = 1
TREE_WIDEST = 64
# Verify passes reading at least this many entries a row take the kernel whatever TREE_MAX_WIDTH says: the masked path
# copies every entry a layer, which grows with the context (H100, width 16: 1.48x a step at 512 entries, 2.01x at
# 2,048; the kernel 1.47x / 1.60x, `bench/round_cost.py`), and a long context is what self-speculation drafts for.
TREE_LONG_KV = 4096
# How `paged_tree` and `paged_decode` split a row's entries (`tree_splits`): into enough splits for about
# TREE_PROGRAMS programs in all (an H100's 132 SMs twice; more only add combine work: the combine kernel runs one
# program per row and KV head, looping over the splits), each reading TREE_MIN_SPLIT entries at least. The decode
# kernel once used fixed splits of 128 entries: a batch of 8 at 32k gave 256 splits a row, and its combine cost as
# much as the attention itself (H100, `bench/profile_long.py`, docs/benchmarks.md). `paged_tree`, whose programs run
# 4 warps (wide heads), aims at TREE_KERNEL_PROGRAMS: on the H100 at 32k entries, 8-23% faster than at 264 (the decode
# kernel was not faster with more: `bench/attention_kernels.py`).
TREE_PROGRAMS = 264
TREE_KERNEL_PROGRAMS = 1056
TREE_MIN_SPLIT = 256
# Tables of at most TREE_SHORT_KV entries (sliding-window rings, a self-speculative draft's window, short contexts)
# split down to TREE_SHORT_SPLIT entries: with few rows, 256-entry splits leave most SMs idle while a program walks
# its tiles one after another, and a short row's combine has few splits anyway.
TREE_SHORT_KV = 2048
TREE_SHORT_SPLIT = 64


def available(q: torch.Tensor) -> bool:
    return triton is not None and q.is_cuda


if triton is not None:
    @triton.jit
    def _attend(q, k, v, live, m, total, acc, scale, PRECISION: tl.constexpr):
        """One tile of online softmax: queries `q` `[M, D]` over entries `k`, `v` `[N, D]` where `live` `[M, N]`."""
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale
        scores = tl.where(live, scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, 1))
        safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with nothing live adds nothing
        p = tl.exp(scores - safe[:, None])
        alpha = tl.exp(m - safe)
        total = total * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        return m_new, total, acc

    @triton.jit
    def _out_offsets(b, h, mq, stride_ob, stride_oh, d, W: tl.constexpr, G: tl.constexpr):
        """Where tile row `mq` of (row `b`, KV head `h`) goes: query `mq // G` of the row, head `h * G + mq % G`."""
        return (b * W + mq // G)[:, None] * stride_ob + (h * G + mq % G)[:, None] * stride_oh + d[None, :]

    @triton.jit
    def _split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lo_ptr, hi_ptr, acc_ptr, stat_ptr, scale,
                      stride_qb, stride_qh, stride_ks, stride_kh, stride_tb,
                      n_splits, split, length, G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_kv = tl.num_programs(1)
        lo, hi = tl.load(lo_ptr + b), tl.load(hi_ptr + b)
        g, d = tl.arange(0, BLOCK_G), tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :], mask=g[:, None] < G,
                    other=0.0)
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, D], tl.float32)
        # Only the tiles of [lo, hi) in this split: the table is as wide as the batch's longest row (or its bucket).
        end = tl.minimum(tl.minimum(s * split + split, hi), length)
        for start in range(tl.maximum(s * split, lo // BLOCK_N * BLOCK_N), end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            live = (n >= lo) & (n < hi) & (n < length)
            slot = tl.load(table_ptr + b * stride_tb + n, mask=live, other=0)
            k = tl.load(k_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=live[:, None], other=0.0)
            v = tl.load(v_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=live[:, None], other=0.0)
            m, total, acc = _attend(q, k, v, live[None, :], m, total, acc, scale, PRECISION)
        row = (b * n_kv + h) * n_splits + s
        tl.store(acc_ptr + (row * BLOCK_G + g)[:, None] * D + d[None, :], acc)
        tl.store(stat_ptr + (row * BLOCK_G + g) * 2, m)
        tl.store(stat_ptr + (row * BLOCK_G + g) * 2 + 1, total)

    @triton.jit
    def _tree_split_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lo_ptr, ctx_ptr, tree_ptr, acc_ptr, stat_ptr, out_ptr,
                           scale, stride_qb, stride_qh, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
                           n_splits, split, length, W: tl.constexpr, G: tl.constexpr, TILES: tl.constexpr,
                           BLOCK_M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LO: tl.constexpr,
                           LO_PER_QUERY: tl.constexpr, WP: tl.constexpr, TREE: tl.constexpr, DIRECT: tl.constexpr,
                           PRECISION: tl.constexpr):
        """Program (row b, KV head h x query tile, split s): tile row r is query (tile * BLOCK_M + r) // G of the
        row, head h * G + (tile * BLOCK_M + r) % G; it reads the entries of split s that some query may see.
        `LO_PER_QUERY`: each query has its own first committed entry (a sliding window; `WP`: W rounded up to a
        power of two). `DIRECT` (one split): writes the output itself; else partial sums and softmax statistics for
        `_combine_kernel`."""
        b, t, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        h, tile = t // TILES, t % TILES
        mq, d = tile * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, D)
        query = mq // G  # which of the row's queries (>= W: tile padding, never stored)
        ok = mq < W * G
        if LO_PER_QUERY:  # the tiles start at the row's smallest; each query masks its own
            lo_q = tl.load(lo_ptr + b * W + tl.minimum(query, W - 1))
            lo = tl.min(tl.load(lo_ptr + b * W + tl.arange(0, WP), mask=tl.arange(0, WP) < W, other=length), 0)
        else:
            lo = tl.load(lo_ptr + b) if HAS_LO else 0
            lo_q = tl.full([BLOCK_M], 0, tl.int32) + lo
        ctx = tl.load(ctx_ptr + b)
        q = tl.load(q_ptr + (b * W + query)[:, None] * stride_qb + (h * G + mq % G)[:, None] * stride_qh + d[None, :],
                    mask=ok[:, None], other=0.0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        # Only the tiles of [lo, ctx + width) in this split: a split past the row's entries runs no iteration.
        end = tl.minimum(tl.minimum(s * split + split, ctx + W), length)
        for start in range(tl.maximum(s * split, lo // BLOCK_N * BLOCK_N), end, BLOCK_N):
            n = start + tl.arange(0, BLOCK_N)
            rel = n - ctx  # index among the row's new entries
            old = (n >= lo) & (rel < 0)
            new = (rel >= 0) & (rel < W) & (n < length)
            slot = tl.load(table_ptr + b * stride_tb + n, mask=old | new, other=0)
            k = tl.load(k_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=(old | new)[:, None],
                        other=0.0)
            v = tl.load(v_ptr + slot[:, None] * stride_ks + h * stride_kh + d[None, :], mask=(old | new)[:, None],
                        other=0.0)
            if TREE:  # the row's ancestor mask (uint8 [rows, W, W])
                seen = tl.load(tree_ptr + (b * W + query)[:, None] * W + rel[None, :],
                               mask=ok[:, None] & new[None, :], other=0) != 0
            else:  # a chain: causal
                seen = new[None, :] & (rel[None, :] <= query[:, None])
            m, total, acc = _attend(q, k, v, (old[None, :] & (n[None, :] >= lo_q[:, None])) | seen, m, total, acc,
                                    scale, PRECISION)
        if DIRECT:
            out = acc / tl.where(total == 0.0, 1.0, total)[:, None]  # nothing seen (never: a query sees itself): 0
            tl.store(out_ptr + _out_offsets(b, h, mq, stride_ob, stride_oh, d, W, G), out, mask=ok[:, None])
        else:
            row = ((b * tl.num_programs(1) + t) * n_splits + s) * BLOCK_M + tl.arange(0, BLOCK_M)
            tl.store(acc_ptr + row[:, None] * D + d[None, :], acc)
            tl.store(stat_ptr + row * 2, m)
            tl.store(stat_ptr + row * 2 + 1, total)

    @triton.jit
    def _combine_kernel(acc_ptr, stat_ptr, out_ptr, n_splits, stride_ob, stride_oh, W: tl.constexpr,
                        G: tl.constexpr, TILES: tl.constexpr, ROWS: tl.constexpr, RP: tl.constexpr, D: tl.constexpr,
                        BLOCK_S: tl.constexpr):
        """Merge the splits of one (row, KV head x query tile) by their softmax statistics: of the `ROWS` rows each
        split stored, the first `RP` (a power of two), those that are queries, into `out`."""
        b, t = tl.program_id(0), tl.program_id(1)
        h, tile = t // TILES, t % TILES
        r, d = tl.arange(0, RP), tl.arange(0, D)
        mq = tile * ROWS + r
        ok = mq < W * G
        s = tl.arange(0, BLOCK_S)
        base = (b * tl.num_programs(1) + t) * n_splits
        m_all = tl.load(stat_ptr + ((base + s)[:, None] * ROWS + r[None, :]) * 2,
                        mask=(s < n_splits)[:, None] & ok[None, :], other=float("-inf"))
        best = tl.max(m_all, 0)  # [RP]
        best = tl.where(best == float("-inf"), 0.0, best)
        norm = tl.zeros([RP], tl.float32)
        out = tl.zeros([RP, D], tl.float32)
        for i in range(0, n_splits):
            row = (base + i) * ROWS + r
            m = tl.load(stat_ptr + row * 2, mask=ok, other=float("-inf"))
            weight = tl.where(m == float("-inf"), 0.0, tl.exp(m - best))  # a split with nothing live adds 0
            norm += tl.load(stat_ptr + row * 2 + 1, mask=ok, other=0.0) * weight
            out += tl.load(acc_ptr + row[:, None] * D + d[None, :], mask=ok[:, None], other=0.0) * weight[:, None]
        out = out / tl.where(norm == 0.0, 1.0, norm)[:, None]
        tl.store(out_ptr + _out_offsets(b, h, mq, stride_ob, stride_oh, d, W, G), out, mask=ok[:, None])


def _precision(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # float32: exact products


@torch.library.custom_op("decodekit::paged_decode", mutates_args=())
def paged_decode(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, table: torch.Tensor,
                 lo: torch.Tensor, hi: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of one query per row: `q` `[B, Hq, D]` over the pool `k_store`, `v_store` `[S, Hkv, D]` at the
    slots `table` `[B, L]`, entries [lo, hi) of each row; returns `[B, Hq, D]`."""
    rows, hq, dim = q.shape
    hkv, length = k_store.shape[1], table.shape[1]
    groups = hq // hkv
    block_g = max(16, triton.next_power_of_2(groups))  # tl.dot needs 16 rows
    n_splits, split = tree_splits(rows * hkv, length, BLOCK_N)
    q = q.contiguous()
    table = table.contiguous()
    acc = torch.empty(rows * hkv * n_splits * block_g, dim, dtype=torch.float32, device=q.device)
    stat = torch.empty(rows * hkv * n_splits * block_g, 2, dtype=torch.float32, device=q.device)
    _split_kernel[(rows, hkv, n_splits)](
        q, k_store, v_store, table, lo, hi, acc, stat, scale, q.stride(0), q.stride(1), k_store.stride(0),
        k_store.stride(1), table.stride(0), n_splits, split, length, G=groups, BLOCK_G=block_g, D=dim,
        BLOCK_N=BLOCK_N, PRECISION=_precision(q), num_warps=DECODE_WARPS, num_stages=DECODE_STAGES)
    out = torch.empty(rows, hq, dim, dtype=q.dtype, device=q.device)
    _combine_kernel[(rows, hkv)](acc, stat, out, n_splits, out.stride(0), out.stride(1), W=1, G=groups, TILES=1,
                                 ROWS=block_g, RP=triton.next_power_of_2(groups), D=dim,
                                 BLOCK_S=triton.next_power_of_2(n_splits))
    return out


@paged_decode.register_fake
def _(q, k_store, v_store, table, lo, hi, scale):
    return torch.empty_like(q)


def tree_tiles(queries: int, head_bytes: int) -> tuple[int, int, int, int]:
    """`paged_tree`'s tiles for `queries` (query, head) pairs a KV head and heads of `head_bytes`: (pairs a tile, at
    least 16 for tl.dot and at most 64; entries a step; warps; pipeline stages). Heads over 256 bytes (bfloat16 256,
    float32 128) take `TREE_WIDE_ROWS` pairs a tile at most and `TREE_WIDE_TILE`."""
    if head_bytes > 256:
        return (min(max(16, triton.next_power_of_2(queries)), TREE_WIDE_ROWS),) + TREE_WIDE_TILE
    block_m = min(max(16, triton.next_power_of_2(queries)), 64)
    return block_m, BLOCK_N, TREE_WARPS or (4 if block_m * head_bytes < 4096 else 8), TREE_STAGES


def tree_splits(programs: int, length: int, block_n: int, target: int | None = None) -> tuple[int, int]:
    """`(splits, entries a split)` of tables `length` entries long, in whole tiles of `block_n`, for a pass of
    `programs` programs a split aiming at `target` programs in all (None: TREE_PROGRAMS; module constants above).
    From static shapes only: a captured graph keeps them."""
    tiles = triton.cdiv(length, block_n)
    least = TREE_SHORT_SPLIT if length <= TREE_SHORT_KV else TREE_MIN_SPLIT
    n = max(1, min(triton.cdiv(target or TREE_PROGRAMS, programs), tiles // triton.cdiv(least, block_n)))
    per = triton.cdiv(tiles, n) * block_n
    return triton.cdiv(length, per), per


@torch.library.custom_op("decodekit::paged_tree", mutates_args=())
def paged_tree(q: torch.Tensor, k_store: torch.Tensor, v_store: torch.Tensor, table: torch.Tensor,
               lo: Optional[torch.Tensor], ctx: torch.Tensor, tree: Optional[torch.Tensor],
               scale: float) -> torch.Tensor:
    """Attention of `width` queries per row: `q` `[rows * width, Hq, D]` (row-major) over the pool `k_store`,
    `v_store` `[S, Hkv, D]` at the slots `table` `[rows, L]`. Query i of row b sees the entries [lo_b, ctx_b)
    (`lo` `[rows]`, None: 0; or `[rows * width]`, one per query: a sliding window) and the new entry ctx_b + j where
    `tree[b, i, j]` (`[rows, width, width]` bool; None: j <= i, a chain). Every query should see one entry at least
    (its own: padding too); one that sees none gets 0. Returns `[rows * width, Hq, D]`."""
    n, hq, dim = q.shape
    rows, length = table.shape
    width = n // rows
    hkv = k_store.shape[1]
    groups = hq // hkv
    block_m, block_n, warps, stages = tree_tiles(width * groups, dim * q.element_size())
    tiles = triton.cdiv(width * groups, block_m)
    n_splits, split = tree_splits(rows * hkv * tiles, length, block_n, TREE_KERNEL_PROGRAMS)
    q, table = q.contiguous(), table.contiguous()
    tree_u8 = tree.contiguous().view(torch.uint8) if tree is not None else ctx  # ctx: an unread placeholder
    out = torch.empty_like(q)
    parts = rows * hkv * tiles * n_splits * block_m if n_splits > 1 else 1
    acc = torch.empty(parts, dim, dtype=torch.float32, device=q.device)
    stat = torch.empty(parts, 2, dtype=torch.float32, device=q.device)
    _tree_split_kernel[(rows, hkv * tiles, n_splits)](
        q, k_store, v_store, table, lo if lo is not None else ctx, ctx, tree_u8, acc, stat, out, scale,
        q.stride(0), q.stride(1), k_store.stride(0), k_store.stride(1), table.stride(0), out.stride(0),
        out.stride(1), n_splits, split, length, W=width, G=groups, TILES=tiles, BLOCK_M=block_m, D=dim,
        BLOCK_N=block_n, HAS_LO=lo is not None, LO_PER_QUERY=lo is not None and lo.numel() != rows,
        WP=triton.next_power_of_2(width), TREE=tree is not None, DIRECT=n_splits == 1,
        PRECISION=_precision(q), num_warps=warps, num_stages=stages)
    if n_splits > 1:
        _combine_kernel[(rows, hkv * tiles)](acc, stat, out, n_splits, out.stride(0), out.stride(1), W=width,
                                             G=groups, TILES=tiles, ROWS=block_m,
                                             RP=min(block_m, triton.next_power_of_2(width * groups)), D=dim,
                                             BLOCK_S=triton.next_power_of_2(n_splits))
    return out


@paged_tree.register_fake
def _(q, k_store, v_store, table, lo, ctx, tree, scale):
    return torch.empty_like(q)
