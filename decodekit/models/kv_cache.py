"""KV memory in blocks: a pool of slots per layer, reference-counted blocks, and one sequence's view of them.

- `KVPool` holds keys and values of every layer as `[layers, slots, kv_heads, head_dim]`, plus the position of the
  token in each slot. Slots come in blocks of `block_size`; block 0 is scratch: padding tokens write there and
  table entries past a sequence's tokens read there, so every gathered value is finite.
- `BlockAllocator` hands out blocks with reference counts, so a fork (n samples, beams) shares its parent's blocks
  without copying, and keeps a chained hash of every full block of committed tokens, so a prompt prefix seen before
  (a system prompt) is prefilled once (prefix caching, as vLLM and nano-vllm do it).
- `SeqKV` is one sequence's block table and length: append, rollback, keep one path of a token tree, fork, free;
  and, for KV presses, compact (keep a subset of entries, each with its position) and hand leading blocks over to
  a store outside the pool (quantized KV held packed).

Nothing here knows about attention: the model reads a batch's `slot_table` (`slot_table()`) and writes at slots.

Sliding-window layers on a ring (issue #16). A layer that attends only to its last `window` positions (Gemma 3's
local layers) never reads an entry again once `window` newer ones exist, so a pool may give such layers storage of
their own: layers are grouped by capacity (`capacity[layer]`: None = the full pool, else a ring of that many
entries, whole blocks); each group of ring layers is a `Ring` (its own keys, values, positions and allocator), and
every sequence holds up to `capacity / block_size` blocks of each ring (taken as its entries grow, until the ring
wraps). Entry e of a sequence lives in ring slot `ring_blocks[(e // block_size) % n_blocks] * block_size +
e % block_size`: rings are indexed by ENTRIES, not positions, so draft trees (several entries at one position),
rolled-back drafts and compacted paths (`keep_path`, a press's `compact`) work as in the full pool. The invariant:
a ring of R entries holds the last R entries written; a pass writes at most `max_pass` entries past a sequence's
committed ones (a decode row, root + draft, is checked when the request is added; fused greedy chunks write at
most a chunk ahead). A wider pass is a chain whose entries are all kept (a prefill chunk): it writes only its last
R entries into the ring (the others to scratch), and its ring layers read the `span` entries before it (gathered
before its writes land) and then its own keys, from the pass itself (`transformer._ring_view`). A pass reads a ring through a table of `span` = R - max_pass
columns, the entries [first, first + span) of each row, first = max(0, valid - span) (`ring_slot_table`), so
attention in ring layers costs `span`, not the sequence's length; the decode kernel gets its [lo, hi) in those
columns (`transformer.py`). Why R = window + 2 max_pass (`transformer.ring_capacity`): span >= window + max_pass
covers every committed entry a query of the pass may see by its window plus the pass's own entries, so none of
them is overwritten during the pass; and entries written past `length` and then dropped (rejected drafts, a
greedy chunk launched ahead) overwrite, with their recent positions, slots of entries at most R - max_pass behind
the next pass's first new entry, which lie before `first`: no table ever shows such an alias. Entries before a
table's span may be overwritten: their positions lie a window or more behind every later query. Where entries
are moved (keep_path, compaction, copies), each destination slot gets its entry's true position, so stale keys of
an entry already overwritten stay masked by the window (positions in `Ring.slot_pos`, masks as today).
A fork shares its parent's ring blocks (n samples, beams, search hypotheses), and a sequence about to write
entries into a shared ring block first takes a copy of its own (`_own_ring_entries`, from `ensure` and every move):
a ring wraps, so the copy happens at the write, not at the fork. What a ring cannot do: a sequence of a pool with
rings neither adopts cached prefixes nor offers its blocks to the cache (a prefix's window entries are not kept).
A quantizing press holds a ring's older entries packed: it gives back the ring blocks that hold none of the entries
it still reads from the ring (`release_ring_entries`; a released block is 0 in the sequence's list and reads as
scratch) and `ensure` takes a block again before an entry is written there; such a sequence no longer evicts.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

EMPTY = -1  # slot_pos of a slot that holds no token
SCRATCH = 0  # the scratch block's first slot: padding writes and out-of-range reads land in block 0


class Storage(nn.Module):
    """Keys and values `[layers, slots, kv_heads, head_dim]` of a group of layers, a position per slot, and the
    allocator of its blocks (block 0: scratch, zeroed)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        slots = num_blocks * block_size
        shape = (num_layers, slots, num_kv_heads, head_dim)
        # `empty`: untouched slots cost no physical memory on the CPU; the scratch block is zeroed (read as padding).
        with torch.inference_mode(False):
            self.register_buffer("k", torch.empty(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer("v", torch.empty(shape, dtype=dtype, device=device), persistent=False)
            self.register_buffer("slot_pos", torch.full((slots,), EMPTY, device=device), persistent=False)
        self.k[:, :block_size].zero_()
        self.v[:, :block_size].zero_()
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks, block_size)

    @property
    def num_slots(self) -> int:
        return self.slot_pos.shape[0]

    def bytes_per_token(self) -> int:
        """Bytes of one slot over this storage's layers (keys and values)."""
        return 2 * self.k.shape[0] * self.k.shape[2] * self.k.shape[3] * self.k.element_size()

    def copy_slots(self, src: list[int] | torch.Tensor, dst: list[int] | torch.Tensor,
                   source: "Storage | None" = None) -> None:
        """Move keys, values and positions from slots `src` (of `source`, default this storage) to slots `dst`
        (every layer of it)."""
        dev = self.k.device
        source = self if source is None else source
        src = torch.as_tensor(src, dtype=torch.long, device=source.k.device)
        dst = torch.as_tensor(dst, dtype=torch.long, device=dev)
        self.k[:, dst] = source.k[:, src].to(dev)
        self.v[:, dst] = source.v[:, src].to(dev)
        self.slot_pos[dst] = source.slot_pos[src].to(dev)


class Ring(Storage):
    """The storage of a group of sliding-window layers: each sequence holds up to `n_blocks` blocks of it, reused
    in a circle (`capacity` = n_blocks * block_size entries), and a pass reads its last `span` entries (see the
    module docstring)."""

    def __init__(self, layers: list[int], capacity: int, span: int, num_blocks: int, block_size: int, *args) -> None:
        if capacity % block_size:
            raise ValueError(f"a ring's capacity ({capacity}) must be whole blocks of {block_size}")
        if num_blocks < capacity // block_size + 1:
            raise ValueError(f"a ring pool of {num_blocks} blocks cannot hold one ring of {capacity // block_size}")
        super().__init__(len(layers), num_blocks, block_size, *args)
        self.layers, self.capacity, self.span, self.n_blocks = list(layers), capacity, span, capacity // block_size


class KVPool(Storage):
    """The KV memory of a model: the full pool (layers whose `capacity` is None: every entry of a sequence), and a
    `Ring` per capacity of the other layers (`max_pass`: the widest pass a sequence may write into them). Without
    rings, `k` and `v` are every layer's, indexed by layer; with rings, use `layer_store(layer)`."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, capacity: list[int | None] | None = None,
                 max_pass: int | None = None, ring_blocks: int | None = None) -> None:
        capacity = capacity or [None] * num_layers
        full = [i for i in range(num_layers) if capacity[i] is None]
        super().__init__(len(full), num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
        self.where: list[tuple[int | None, int]] = [(None, 0)] * num_layers  # layer -> (ring or None, its row)
        for row, i in enumerate(full):
            self.where[i] = (None, row)
        caps = sorted({c for c in capacity if c is not None})
        if caps and (max_pass is None or max_pass < 1):
            raise ValueError("a pool with rings needs max_pass >= 1 (the widest pass written into a ring)")
        self.rings = nn.ModuleList()
        for r, cap in enumerate(caps):
            layers = [i for i in range(num_layers) if capacity[i] == cap]
            self.rings.append(Ring(layers, cap, cap - max_pass, ring_blocks or num_blocks, block_size, num_kv_heads,
                                   head_dim, dtype, device))
            for row, i in enumerate(layers):
                self.where[i] = (r, row)
        self.max_pass = max_pass if caps else None
        self.ring_layers = frozenset(i for i in range(num_layers) if capacity[i] is not None)

    def ring_of(self, layer: int) -> int | None:
        return self.where[layer][0]

    def layer_store(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[slots, kv_heads, head_dim]` of `layer`, in the full pool or its ring."""
        r, row = self.where[layer]
        store = self if r is None else self.rings[r]
        return store.k[row], store.v[row]


class PoolFull(Exception):
    """No free block: the caller waits, preempts, or fails the request."""


class BlockAllocator:
    """Reference-counted blocks with prefix caching. Block 0 is never handed out (scratch).

    A block whose count drops to zero goes back to the free list but keeps its prefix hash, so a later prompt with
    the same prefix can take it back until the block is handed out for something else (least recently freed last).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.refs = [0] * num_blocks
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.hash_of: dict[int, int] = {}  # block -> hash of its tokens (and all before them)
        self.block_of: dict[int, int] = {}  # hash -> block

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def capacity(self) -> int:
        """Blocks a sequence could ever use (all but scratch)."""
        return self.num_blocks - 1

    def allocate(self) -> int:
        if not self.free:
            raise PoolFull("KV pool exhausted")
        block, _ = self.free.popitem(last=False)
        old = self.hash_of.pop(block, None)
        if old is not None and self.block_of.get(old) == block:
            del self.block_of[old]
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        if self.refs[block] == 0:
            del self.free[block]
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free[block] = None
        elif self.refs[block] < 0:
            raise RuntimeError(f"block {block} released more often than taken")

    # ---- prefix caching ------------------------------------------------------------------------------------
    @staticmethod
    def chain_hash(previous: int, tokens: list[int]) -> int:
        return hash((previous, tuple(tokens)))

    def register(self, block: int, h: int) -> None:
        """`block` is full of committed tokens whose chained hash is `h`: later prompts may reuse it."""
        self.hash_of[block] = h
        self.block_of.setdefault(h, block)

    def lookup(self, h: int) -> int | None:
        return self.block_of.get(h)


class SeqKV:
    """One sequence's KV memory: a block table into a pool and the number of logical entries written.

    Logical entry i lives in slot `blocks[i // block_size - virtual] * block_size + i % block_size`. Blocks shared
    with other sequences (forks, cached prefixes) are only ever read: a sequence writes from its own `length` on,
    which lies in blocks it owns alone (a fork copies a shared partial last block first; `compact` copies on write).
    In each ring of the pool (sliding-window layers) it holds `rings[r]`, blocks of its own, never shared; entry i
    lives in ring slot `ring_slots` (the module docstring).

    Without a press, entry i holds token i. A press may break that: `compact` keeps a subset of the entries (each
    keeps its token's position in the pool's `slot_pos`), counting the dropped ones in `evicted`; `hand_over`
    moves the first blocks out of the pool (`virtual` leading blocks, read as scratch; their owner, a quantizing
    press, holds them packed and supplies them to attention). `written` = tokens whose KV was written, held or not.
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.rings: list[list[int]] = [[] for _ in getattr(pool, "rings", ())]  # ring blocks, per ring of the pool
        self.length = 0
        self.hashes: list[int] = []  # chained hash of each full block registered for prefix caching
        self.evicted = 0  # entries dropped by `compact`
        self.virtual = 0  # leading logical blocks held outside the pool (`hand_over`)

    @property
    def alloc(self) -> BlockAllocator:
        return self.pool.allocator

    @property
    def written(self) -> int:
        """Tokens whose keys and values were written: the entries held plus those a press evicted."""
        return self.length + self.evicted

    @property
    def dense(self) -> bool:
        """Entry i holds token i, in the pool (what prefix caching needs)."""
        return not self.evicted and not self.virtual

    @property
    def ring_released(self) -> bool:
        """Some ring block was given back (`release_ring_entries`): the rings no longer hold every window entry."""
        return any(0 in blocks for blocks in self.rings)

    @property
    def shares_prefixes(self) -> bool:
        """Whether cached prompt blocks may be adopted and offered: not with rings (a ring holds one sequence's
        window entries only, and is not shared)."""
        return not self.rings

    @property
    def max_pass(self) -> int | None:
        """The most entries one pass may write past `length` (None: no limit): what the pool's rings allow."""
        return getattr(self.pool, "max_pass", None)

    @property
    def capacity(self) -> int:
        return (self.virtual + len(self.blocks)) * self.pool.block_size

    def table(self) -> list[int]:
        """Block of each logical block, in order (blocks held outside the pool read as the scratch block)."""
        return [0] * self.virtual + self.blocks

    def blocks_needed(self, n: int) -> int:
        """Blocks to add so that `n` logical entries fit."""
        return max(0, -(-n // self.pool.block_size) - self.virtual - len(self.blocks))

    def ring_blocks_needed(self, r: int, n: int) -> int:
        """Blocks of ring `r` to add so that `n` logical entries fit (a ring grows until it wraps), released blocks
        that entries [length, n) will be written to included (`release_ring_entries`)."""
        ring = self.pool.rings[r]
        return max(0, min(ring.n_blocks, -(-n // ring.block_size)) - len(self.rings[r])) + len(self._ring_holes(r, n))

    def _ring_holes(self, r: int, n: int) -> list[int]:
        """Indices (in this sequence's list of ring `r`'s blocks) of released blocks that entries [length, n) map to."""
        blocks = self.rings[r]
        if n <= self.length or 0 not in blocks:
            return []
        ring = self.pool.rings[r]
        bs, nb = ring.block_size, ring.n_blocks
        held = {(b % nb) for b in range(self.length // bs, -(-n // bs))}
        return sorted(i for i in held if i < len(blocks) and blocks[i] == 0)

    def fits(self, n: int, spare: int = 0) -> bool:
        """Whether the free blocks (keeping `spare` of the pool's) cover `n` logical entries, rings included (and
        the copies of ring blocks a fork shares that entries up to `n` would write)."""
        return self.blocks_needed(n) + spare <= self.alloc.num_free and all(
            self.ring_blocks_needed(r, n) + len(self._shared_ring_blocks(r, range(self.length, n)))
            <= ring.allocator.num_free for r, ring in enumerate(self.pool.rings))

    def ensure(self, n: int) -> None:
        """Own enough blocks for `n` logical entries, and own alone the ring blocks that entries [length, n) will
        be written to (raises PoolFull, keeping what it got, if the pool runs out)."""
        for _ in range(self.blocks_needed(n)):
            self.blocks.append(self.alloc.allocate())
        for r, ring in enumerate(self.rings):
            alloc = self.pool.rings[r].allocator
            for i in self._ring_holes(r, n):
                ring[i] = alloc.allocate()
            for _ in range(self.ring_blocks_needed(r, n)):  # (the holes are filled: growth only)
                ring.append(alloc.allocate())
        self._own_ring_entries(range(self.length, n))

    def release_ring_entries(self, r: int, start: int) -> None:
        """Entries of ring `r` before `start` are no longer read from it (a quantizing press holds them packed, or
        they left every window): its blocks that hold no entry of [start, length) go back to the ring's pool (a
        released block reads as scratch; `ensure` takes one again before entries are written there)."""
        ring, blocks = self.pool.rings[r], self.rings[r]
        bs, nb = ring.block_size, ring.n_blocks
        live = {b % nb for b in range(start // bs, -(-self.length // bs))} if start < self.length else set()
        for i, b in enumerate(blocks):
            if b and i not in live:
                ring.allocator.release(b)
                blocks[i] = 0

    def _shared_ring_blocks(self, r: int, entries) -> list[int]:
        """Indices (in this sequence's list of ring `r`'s blocks) of the blocks holding `entries` that a fork
        shares."""
        ring, blocks = self.pool.rings[r], self.rings[r]
        held = {(e // ring.block_size) % ring.n_blocks for e in entries}
        return sorted(i for i in held if i < len(blocks) and ring.allocator.refs[blocks[i]] > 1)

    def _own_ring_entries(self, entries) -> None:
        """Copy on write: before `entries` are written, each ring block holding one of them that a fork shares is
        replaced by a copy of its own (forks share their rings until one of them writes: a ring's blocks are
        overwritten in place as it wraps, so sharing needs the copy at the write, not at the fork)."""
        bs = self.pool.block_size
        for r, blocks in enumerate(self.rings):
            ring = self.pool.rings[r]
            for i in self._shared_ring_blocks(r, entries):
                fresh = ring.allocator.allocate()
                ring.copy_slots([blocks[i] * bs + j for j in range(bs)], [fresh * bs + j for j in range(bs)])
                ring.allocator.release(blocks[i])
                blocks[i] = fresh

    def trim(self) -> None:
        """Give back the blocks past `length` (a ring keeps its blocks: they hold the window)."""
        keep = max(0, -(-self.length // self.pool.block_size) - self.virtual)
        for b in self.blocks[keep:]:
            self.alloc.release(b)
        del self.blocks[keep:]
        del self.hashes[keep:]

    def slots(self, start: int, n: int) -> list[int]:
        bs, v = self.pool.block_size, self.virtual
        if start < v * bs and n:
            raise ValueError(f"entries from {start} lie in blocks held outside the pool")
        return [self.blocks[i // bs - v] * bs + i % bs for i in range(start, start + n)]

    def slot_tensor(self, entries: torch.Tensor | None = None, start: int = 0, n: int | None = None) -> torch.Tensor:
        """Slots (a tensor on the pool's device) of `entries` (a long tensor), or of entries [start, start + n)
        (default: up to `length`): what `slots` gives, computed on the device (thousands of entries a call)."""
        bs, v, dev = self.pool.block_size, self.virtual, self.pool.k.device
        if entries is None:
            n = self.length - start if n is None else n
            if start < v * bs and n:
                raise ValueError(f"entries from {start} lie in blocks held outside the pool")
            entries = torch.arange(start, start + n, device=dev)
        table = torch.tensor(self.blocks, dtype=torch.long, device=dev)
        return table[entries // bs - v] * bs + entries % bs

    def entry_slots(self, entries: list[int]) -> list[int]:
        """Slots of the given entries in the full pool."""
        bs, v = self.pool.block_size, self.virtual
        return [self.blocks[i // bs - v] * bs + i % bs for i in entries]

    def ring_slots(self, r: int, entries) -> list[int]:
        """Slots of the given entries (an iterable of indices) in ring `r`."""
        ring, blocks = self.pool.rings[r], self.rings[r]
        bs, nb = ring.block_size, ring.n_blocks
        return [blocks[(i // bs) % nb] * bs + i % bs for i in entries]

    def rollback(self, length: int) -> None:
        """Forget entries from `length` on (their blocks stay until `trim`: the next pass may write there)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: {self.length} entries held")
        self.length = length

    def _move_ring_entries(self, src: list[int], dst: list[int] | range, positions: torch.Tensor,
                           source: "SeqKV | None" = None) -> None:
        """In every ring, entry src[i] (of `source`, default this sequence) -> entry dst[i], with its true position
        `positions[i]`. Only the destinations among this sequence's last `capacity` entries are written (the others
        would be overwritten at once); a source entry already overwritten moves stale keys, which its (old) position
        masks out of every later query's window."""
        source = self if source is None else source
        end = max(dst, default=-1) + 1
        for r, ring in enumerate(self.pool.rings):
            pick = [i for i, d in enumerate(dst) if d >= end - ring.capacity]
            if not pick:
                continue
            self._own_ring_entries([dst[i] for i in pick])
            to = torch.as_tensor(self.ring_slots(r, [dst[i] for i in pick]), dtype=torch.long, device=ring.k.device)
            ring.copy_slots(source.ring_slots(r, [src[i] for i in pick]), to, source=source.pool.rings[r])
            ring.slot_pos[to] = positions[pick].to(ring.slot_pos.device)

    def keep_path(self, start: int, nodes: list[int]) -> None:
        """After a tree written at entries `start...`, keep only the nodes `nodes` (in path order), moved to entries
        start, start+1, ...; the rest is dropped."""
        n = len(nodes)
        if list(nodes) != list(range(n)):  # decided on the host: no device work on the common chain path
            src = [self.slots(start + i, 1)[0] for i in nodes]
            self.pool.copy_slots(src, self.slots(start, n))
            self._own_ring_entries(range(start, start + n))  # written by the pass: already its own, normally
            for r, ring in enumerate(self.pool.rings):  # the tree's entries were just written: all in the ring
                ring.copy_slots(self.ring_slots(r, [start + i for i in nodes]), self.ring_slots(r, range(start,
                                                                                                         start + n)))
        self.length = start + n

    def compact(self, keep: list[int] | torch.Tensor) -> None:
        """Keep only the entries `keep` (ascending), moved to entries 0, 1, ...; each keeps its position. Freed
        blocks return to the pool; blocks shared with other sequences (or offered to the prefix cache) are not
        written: the kept entries that land there go to fresh blocks instead (copy on write). Rings move their
        entries likewise (`_move_ring_entries`)."""
        if self.virtual or self.ring_released:
            raise ValueError("cannot evict from a sequence whose first blocks are held outside the pool")
        # Checked and moved with tensors: a press compacts thousands of entries at once (a host loop over them costs
        # milliseconds, a sequence's whole decode step at batch 32).
        kept = torch.as_tensor(keep, dtype=torch.long).cpu()
        n, bs = kept.numel(), self.pool.block_size
        if n and (bool((kept[1:] <= kept[:-1]).any()) or not 0 <= int(kept[0]) <= int(kept[-1]) < self.length):
            raise ValueError("entries to keep must be ascending and held")
        if not n or int(kept[-1]) == n - 1:  # ascending: the first n entries
            self.evicted += self.length - n
            self.length = n
            self.trim()
            return
        src = self.slot_tensor(kept.to(self.pool.k.device))
        if self.rings:  # only the last `capacity` destinations land in a ring; positions from the full pool's slots
            tail = min(n, max(ring.capacity for ring in self.pool.rings))
            self._move_ring_entries(kept[n - tail:].tolist(), range(n - tail, n), self.pool.slot_pos[src[n - tail:]])
        old = list(self.blocks)
        fresh = {}  # block index -> newly allocated block, for destinations this sequence must not write
        for j in range(-(-n // bs)):
            b = self.blocks[j]
            if self.alloc.refs[b] > 1 or b in self.alloc.hash_of:
                fresh[j] = self.alloc.allocate()  # before any release: the source stays intact
        for j, b in fresh.items():
            self.blocks[j] = b
        self.pool.copy_slots(src, self.slot_tensor(start=0, n=n))
        for j in fresh:
            self.alloc.release(old[j])
        self.hashes = []
        self.evicted += self.length - n
        self.length = n
        self.trim()

    def append_from(self, source: "SeqKV", entries: list[int]) -> None:
        """Append copies of `source`'s entries `entries` (ascending; same pool layout) after this sequence's own,
        in the full pool and every ring (a drafter's cache built from its target's)."""
        start, n = self.length, len(entries)
        self.ensure(start + n)
        src = source.entry_slots(entries)
        self.pool.copy_slots(src, self.slots(start, n), source=source.pool)
        if self.rings:
            positions = source.pool.slot_pos[torch.as_tensor(src, dtype=torch.long,
                                                             device=source.pool.slot_pos.device)]
            self._move_ring_entries(entries, list(range(start, start + n)), positions, source)
        self.length = start + n

    def hand_over(self, n_blocks: int) -> None:
        """The first `n_blocks` real blocks leave the pool (their owner keeps them elsewhere): they are released and
        read as scratch from now on. Rings keep theirs."""
        if n_blocks > len(self.blocks) or (self.virtual + n_blocks) * self.pool.block_size > self.length:
            raise ValueError(f"cannot hand over {n_blocks} blocks: only full blocks of held entries can leave")
        for b in self.blocks[:n_blocks]:
            self.alloc.release(b)
        del self.blocks[:n_blocks]
        self.hashes = []
        self.virtual += n_blocks

    def fork(self) -> "SeqKV":
        """A sequence with the same entries: full blocks shared, a partial last block copied, ring blocks shared
        (copied when either sequence first writes to one: `_own_ring_entries`)."""
        child = SeqKV(self.pool)
        bs, v = self.pool.block_size, self.virtual
        full = self.length // bs - v  # full blocks held in the pool
        if self.length % bs:  # first: PoolFull here leaves nothing shared to undo
            child.blocks.append(self.alloc.allocate())
        for r, blocks in enumerate(self.rings):
            for b in blocks:
                if b:  # (0: a released block, `release_ring_entries`)
                    self.pool.rings[r].allocator.share(b)
            child.rings[r] = list(blocks)
        partial = child.blocks
        for b in self.blocks[:full]:
            self.alloc.share(b)
        child.blocks = self.blocks[:full] + partial
        child.hashes = list(self.hashes[:full])
        child.length, child.evicted, child.virtual = self.length, self.evicted, v
        if partial:
            n = self.length % bs
            src = [self.blocks[full] * bs + i for i in range(n)]
            self.pool.copy_slots(src, [partial[0] * bs + i for i in range(n)])
        return child

    def free(self) -> None:
        self.length = 0
        self.virtual = 0
        self.trim()
        self.evicted = 0
        for r, blocks in enumerate(self.rings):
            for b in blocks:
                if b:
                    self.pool.rings[r].allocator.release(b)
            blocks.clear()

    def held_bytes(self) -> int:
        """Bytes of the pool blocks this sequence holds (owned or shared), rings included."""
        bs = self.pool.block_size
        return len(self.blocks) * bs * self.pool.bytes_per_token() + sum(
            sum(map(bool, blocks)) * bs * ring.bytes_per_token() for blocks, ring in zip(self.rings, self.pool.rings))

    def bytes_for(self, entries: int) -> int:
        """Bytes `entries` entries take in this sequence's pool: whole blocks of the full pool, and the blocks of each
        ring they fill (a ring stops growing at its capacity)."""
        bs = self.pool.block_size
        blocks = -(-entries // bs)
        return blocks * bs * self.pool.bytes_per_token() + sum(
            min(blocks, ring.n_blocks) * bs * ring.bytes_per_token() for ring in self.pool.rings)

    # ---- prefix caching ------------------------------------------------------------------------------------
    def adopt_prefix(self, tokens: list[int], limit: int) -> int:
        """Take cached blocks holding a prefix of `tokens` (at most `limit` tokens, whole blocks); returns how many
        entries were adopted. Only for an empty sequence (and none with rings: `shares_prefixes`)."""
        assert not self.blocks, "adopt_prefix needs an empty sequence"
        if not self.shares_prefixes:
            return 0
        bs, h = self.pool.block_size, 0
        for i in range(limit // bs):
            h = BlockAllocator.chain_hash(h, tokens[i * bs:(i + 1) * bs])
            block = self.alloc.lookup(h)
            if block is None:
                break
            self.alloc.share(block)
            self.blocks.append(block)
            self.hashes.append(h)
        self.length = len(self.blocks) * bs
        return self.length

    def register_full_blocks(self, tokens: list[int]) -> None:
        """Offer every full block of committed `tokens` (the first `length` tokens of the text) to the cache; only
        while entry i holds token i."""
        if not self.dense or not self.shares_prefixes:
            return
        bs = self.pool.block_size
        h = self.hashes[-1] if self.hashes else 0
        for i in range(len(self.hashes), min(self.length, len(tokens)) // bs):
            h = BlockAllocator.chain_hash(h, tokens[i * bs:(i + 1) * bs])
            self.hashes.append(h)
            self.alloc.register(self.blocks[i], h)


def slot_table(block_tables: torch.Tensor, valid: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """`[rows, length]` physical slot of each logical entry: from `block_tables` `[rows, blocks]` for entries below
    `valid` `[rows]`, the scratch slot beyond (never-written memory is never read)."""
    idx = torch.arange(length, device=block_tables.device)
    blocks = block_tables.index_select(1, idx // block_size)
    slots = blocks * block_size + idx % block_size
    return torch.where(idx[None] < valid[:, None], slots, SCRATCH)


def ring_slot_table(blocks: torch.Tensor, valid: torch.Tensor, span: int,
                    block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A ring's table for a pass: `[rows, span]` slots of the entries [first, first + span) of each row, `first` =
    max(0, valid - span), from the ring blocks `blocks` `[rows, n_blocks]` (entries from `valid` on read the scratch
    slot); and `first` `[rows]`."""
    n_blocks = blocks.shape[1]
    first = (valid - span).clamp_min(0)
    entry = first[:, None] + torch.arange(span, device=blocks.device)[None]
    slots = blocks.gather(1, (entry // block_size) % n_blocks) * block_size + entry % block_size
    return torch.where(entry < valid[:, None], slots, SCRATCH), first


def private_pool(model, max_len: int, block_size: int = 256) -> tuple[KVPool, SeqKV]:
    """A pool for one sequence of up to `max_len` entries (a drafter's own cache), and that sequence."""
    pool = model.make_pool(-(-max_len // block_size) + 1, block_size)  # a tensor-parallel model: on every rank
    return pool, SeqKV(pool)
