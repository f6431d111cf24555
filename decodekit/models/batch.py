"""What one forward pass computes: flat tokens, where each is written, and what each attends to.

A pass scores several sequences at once. Each contributes a *row*: its new tokens (a prefill chunk, or a root token
plus its draft tree), written to its KV memory after the entries it already holds. Rows of similar width form a
*group*, padded to a common width; the tokens of all groups are laid out flat, group after group, so linear layers
see one `[N, hidden]` matrix and only attention works per group. Padding tokens write to the scratch block and see
only themselves. A pool with rings (sliding-window layers, `kv_cache.py`) gets, per ring, its own write slots and a
table of the ring's entries for each row (`RingRows`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .kv_cache import SCRATCH, SeqKV, ring_slot_table, slot_table


@dataclass
class RingRows:
    """What a group's rows read in one ring: `table` `[rows, span]` slots of the entries [first, first + span) of
    each row (`kv_cache.ring_slot_table`)."""

    table: torch.Tensor
    first: torch.Tensor  # [rows]
    # A pass wider than the ring's `max_pass` (a prefill chunk): the entries before it, [first, first + span) with
    # first = max(0, ctx - span), which its ring layers read before its own keys overwrite them; None otherwise.
    before: torch.Tensor | None = None


@dataclass
class Rows:
    """An attention group: `rows` sequences with `width` query tokens each, at flat tokens
    [start, start + rows * width)."""

    start: int
    rows: int
    width: int
    slot_table: torch.Tensor  # [rows, L] physical slot of each logical KV entry a query may read
    ctx: torch.Tensor  # [rows] entries committed before this pass's tokens: every query sees them (causally)
    tree: torch.Tensor | None = None  # [rows, width, width] ancestors (incl. self) inside the new block; None: causal
    observers: list[tuple[int, Any]] | None = None  # (row, observer): rows whose attention a KV press takes part in
    rings: list[RingRows] = field(default_factory=list)  # per ring of the pool
    # Attention through the paged tree kernel up to `kernels.TREE_WIDEST` wide, whatever `kernels.TREE_MAX_WIDTH`
    # says (fused draft rounds: measured faster there, `docs/benchmarks.md`)
    tree_kernel: bool = False


@dataclass
class ForwardBatch:
    tokens: torch.Tensor  # [N]
    positions: torch.Tensor  # [N] rotary positions (padding: 0)
    write_slots: torch.Tensor  # [N] where each token's key and value go (padding: scratch)
    groups: list[Rows]
    logit_rows: torch.Tensor | None = None  # [M] flat rows to return logits (and hidden states) for; None: all
    hidden_layers: tuple[int, ...] = ()  # also return these layers' outputs (index num_layers: final norm)
    ring_writes: list[torch.Tensor] = field(default_factory=list)  # [N] per ring of the pool: its write slots


@dataclass
class RowSpec:
    """One sequence's part of a pass, on the host. `kv` must already own room for `kv.length + len(tokens)`."""

    kv: SeqKV
    tokens: list[int]
    positions: list[int]
    tree: torch.Tensor | None = None  # [w, w] bool ancestor mask incl. self; None: a causal chain
    logits: str = "all"  # "all" | "last" | "none": which of its tokens need logits
    # A KV press's part in this row's attention (`models.transformer.observe_rows`): it sees the row's queries, keys
    # and mask in every layer and may change them. None: plain attention (and every fast path).
    observer: Any = None
    first_logit: int = field(default=-1, init=False)  # set by `build_batch`: its first row in the logits
    hidden_layers: tuple[int, ...] = field(default=(), init=False)  # layers whose states its sequence reads


def bucket(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket >= n (n itself past the largest)."""
    return next((b for b in buckets if b >= n), n)


@dataclass
class GroupLayout:
    """One group's rows laid out on the host, padded to `rows` x `width` and to `length` KV entries."""

    tokens: list[int]
    positions: list[int]
    write_slots: list[int]
    tables: torch.Tensor  # [rows, blocks] block tables (0 = scratch)
    ctx: torch.Tensor  # [rows] entries before this pass
    valid: torch.Tensor  # [rows] entries after this pass (readable)
    tree: torch.Tensor | None  # [rows, width, width], None when every row is a chain
    logit_rows: list[int]  # flat rows (from the group's start) whose logits the specs ask for
    ring_writes: list[list[int]] = field(default_factory=list)  # per ring: each token's write slot
    ring_tables: list[torch.Tensor] = field(default_factory=list)  # per ring: [rows, n_blocks] ring blocks


def layout_group(specs: list[RowSpec], width: int, rows: int, length: int, block_size: int,
                 first_logit: int = 0) -> GroupLayout:
    """Lay out `specs` as a padded group; sets each spec's `first_logit` (counting from `first_logit`)."""
    n_blocks = -(-length // block_size)
    tokens, positions, slots, logit_rows = [], [], [], []
    tables = torch.zeros(rows, n_blocks, dtype=torch.long)
    ctx = torch.zeros(rows, dtype=torch.long)
    valid = torch.zeros(rows, dtype=torch.long)
    tree = torch.eye(width, dtype=torch.bool).repeat(rows, 1, 1) if any(s.tree is not None for s in specs) else None
    rings = specs[0].kv.pool.rings if specs else []
    ring_writes: list[list[int]] = [[] for _ in rings]
    ring_tables = [torch.zeros(rows, ring.n_blocks, dtype=torch.long) for ring in rings]
    for r, s in enumerate(specs):
        w = len(s.tokens)
        if w > width:
            raise ValueError(f"row of {w} tokens in a group {width} wide")
        tokens += s.tokens + [0] * (width - w)
        positions += s.positions + [0] * (width - w)
        slots += s.kv.slots(s.kv.length, w) + [SCRATCH] * (width - w)
        if rings and w > s.kv.max_pass and s.tree is not None:
            raise ValueError(f"a tree of {w} tokens is wider than the sliding-window ring allows ({s.kv.max_pass}: "
                             "load with a larger ring_pass, or window_ring=False)")
        for g, ring in enumerate(rings):
            # A pass wider than the ring keeps only its last `capacity` entries there (earlier ones: scratch); its
            # ring layers read its own keys from the pass itself (`Transformer._ring_view`).
            end = s.kv.length + w
            kept = range(max(s.kv.length, end - ring.capacity), end)
            ring_writes[g] += [SCRATCH] * (w - len(kept)) + s.kv.ring_slots(g, kept) + [SCRATCH] * (width - w)
            ring_tables[g][r, :len(s.kv.rings[g])] = torch.tensor(s.kv.rings[g], dtype=torch.long)
        table = s.kv.table()[:n_blocks]
        tables[r, :len(table)] = torch.tensor(table, dtype=torch.long)
        ctx[r], valid[r] = s.kv.length, s.kv.length + w
        if tree is not None:
            tree[r, :w, :w] = s.tree if s.tree is not None else torch.ones(w, w, dtype=torch.bool).tril_()
        s.first_logit = first_logit + len(logit_rows)
        if s.logits == "all":
            logit_rows += range(r * width, r * width + w)
        elif s.logits == "last":
            logit_rows.append(r * width + w - 1)
    pad = (rows - len(specs)) * width
    return GroupLayout(tokens + [0] * pad, positions + [0] * pad, slots + [SCRATCH] * pad, tables, ctx, valid, tree,
                       logit_rows, [w + [SCRATCH] * pad for w in ring_writes], ring_tables)


def build_batch(groups: list[list[RowSpec]], device: torch.device, widths: list[int] | None = None,
                rows: list[int] | None = None, kv_len: int | None = None,
                hidden_layers: tuple[int, ...] = ()) -> ForwardBatch:
    """Lay `groups` of rows out flat; `widths` / `rows` pad each group (default: its widest row / its row count);
    `kv_len` pads every slot table (default: the longest row's entries). Sets each spec's `first_logit`."""
    tokens, positions, slots, logit_rows, out = [], [], [], [], []
    rings = groups[0][0].kv.pool.rings if groups else []
    ring_writes: list[list[int]] = [[] for _ in rings]
    start = 0
    for gi, specs in enumerate(groups):
        width = widths[gi] if widths else max(len(s.tokens) for s in specs)
        n_rows = rows[gi] if rows else len(specs)
        length = kv_len or max(s.kv.length + width for s in specs)
        bs = specs[0].kv.pool.block_size
        g = layout_group(specs, width, n_rows, length, bs, len(logit_rows))
        tokens += g.tokens
        positions += g.positions
        slots += g.write_slots
        logit_rows += [start + r for r in g.logit_rows]
        valid = g.valid.to(device)
        table = slot_table(g.tables.to(device), valid, length, bs)
        observers = [(r, s.observer) for r, s in enumerate(specs) if s.observer is not None] or None
        wide = rings and width > specs[0].kv.max_pass  # (a prefill chunk: only chains may be, `layout_group`)
        ring_rows = []
        for blocks, ring in zip(g.ring_tables, rings):
            blocks = blocks.to(device)
            before = ring_slot_table(blocks, g.ctx.to(device), ring.span, bs)[0] if wide else None
            ring_rows.append(RingRows(*ring_slot_table(blocks, valid, ring.span, bs), before))
        for r, w in enumerate(g.ring_writes):
            ring_writes[r] += w
        out.append(Rows(start, n_rows, width, table, g.ctx.to(device), None if g.tree is None else g.tree.to(device),
                        observers, ring_rows))
        start += n_rows * width
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return ForwardBatch(as_long(tokens), as_long(positions), as_long(slots), out,
                        as_long(logit_rows) if len(logit_rows) < start else None, hidden_layers,
                        [as_long(w) for w in ring_writes])
