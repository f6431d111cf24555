"""KV memory in blocks: a pool of slots per layer, reference-counted blocks, and one sequence's view of them.

- `KVPool` holds keys and values of every layer as `[layers, slots, kv_heads, head_dim]`, plus the position of the
  token in each slot. Slots come in blocks of `block_size`; block 0 is scratch: padding tokens write there and
  table entries past a sequence's tokens read there, so every gathered value is finite.
- `BlockAllocator` hands out blocks with reference counts, so a fork (n samples, beams) shares its parent's blocks
  without copying, and keeps a chained hash of every full block of committed tokens, so a prompt prefix seen before
  (a system prompt) is prefilled once (prefix caching, as vLLM and nano-vllm do it).
- `SeqKV` is one sequence's block table and length: append, rollback, keep one path of a token tree, fork, free.

Nothing here knows about attention: the model reads a batch's `slot_table` (`slot_table()`) and writes at slots.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

EMPTY = -1  # slot_pos of a slot that holds no token
SCRATCH = 0  # the scratch block's first slot: padding writes and out-of-range reads land in block 0


class KVPool(nn.Module):
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
        return 2 * self.k.shape[0] * self.k.shape[2] * self.k.shape[3] * self.k.element_size()

    def copy_slots(self, src: list[int] | torch.Tensor, dst: list[int] | torch.Tensor) -> None:
        """Move keys, values and positions from slots `src` to slots `dst` (every layer)."""
        dev = self.k.device
        src = torch.as_tensor(src, dtype=torch.long, device=dev)
        dst = torch.as_tensor(dst, dtype=torch.long, device=dev)
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]
        self.slot_pos[dst] = self.slot_pos[src]


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

    Logical entry i lives in slot `blocks[i // block_size] * block_size + i % block_size`. Blocks shared with other
    sequences (forks, cached prefixes) are only ever read: a sequence writes from its own `length` on, which lies in
    blocks it owns alone (a fork copies a shared partial last block first).
    """

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.length = 0
        self.hashes: list[int] = []  # chained hash of each full block registered for prefix caching

    @property
    def alloc(self) -> BlockAllocator:
        return self.pool.allocator

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def blocks_needed(self, n: int) -> int:
        """Blocks to add so that `n` logical entries fit."""
        return max(0, -(-n // self.pool.block_size) - len(self.blocks))

    def ensure(self, n: int) -> None:
        """Own enough blocks for `n` logical entries (raises PoolFull, keeping what it got, if the pool runs out)."""
        for _ in range(self.blocks_needed(n)):
            self.blocks.append(self.alloc.allocate())

    def trim(self) -> None:
        """Give back the blocks past `length`."""
        keep = -(-self.length // self.pool.block_size)
        for b in self.blocks[keep:]:
            self.alloc.release(b)
        del self.blocks[keep:]
        del self.hashes[keep:]

    def slots(self, start: int, n: int) -> list[int]:
        bs = self.pool.block_size
        return [self.blocks[i // bs] * bs + i % bs for i in range(start, start + n)]

    def rollback(self, length: int) -> None:
        """Forget entries from `length` on (their blocks stay until `trim`: the next pass may write there)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: {self.length} entries held")
        self.length = length

    def keep_path(self, start: int, nodes: list[int]) -> None:
        """After a tree written at entries `start...`, keep only the nodes `nodes` (in path order), moved to entries
        start, start+1, ...; the rest is dropped."""
        n = len(nodes)
        if list(nodes) != list(range(n)):  # decided on the host: no device work on the common chain path
            src = [self.slots(start + i, 1)[0] for i in nodes]
            self.pool.copy_slots(src, self.slots(start, n))
        self.length = start + n

    def fork(self) -> "SeqKV":
        """A sequence with the same entries: full blocks shared, a partial last block copied."""
        child = SeqKV(self.pool)
        bs = self.pool.block_size
        full = self.length // bs
        for b in self.blocks[:full]:
            self.alloc.share(b)
        child.blocks = self.blocks[:full]
        child.hashes = list(self.hashes[:full])
        child.length = self.length
        if self.length % bs:
            block = self.alloc.allocate()
            child.blocks.append(block)
            n = self.length % bs
            src = [self.blocks[full] * bs + i for i in range(n)]
            self.pool.copy_slots(src, [block * bs + i for i in range(n)])
        return child

    def free(self) -> None:
        self.length = 0
        self.trim()

    # ---- prefix caching ------------------------------------------------------------------------------------
    def adopt_prefix(self, tokens: list[int], limit: int) -> int:
        """Take cached blocks holding a prefix of `tokens` (at most `limit` tokens, whole blocks); returns how many
        entries were adopted. Only for an empty sequence."""
        assert not self.blocks, "adopt_prefix needs an empty sequence"
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
        """Offer every full block of committed `tokens` (the first `length` tokens of the text) to the cache."""
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


def private_pool(model, max_len: int, block_size: int = 256) -> tuple[KVPool, SeqKV]:
    """A pool for one sequence of up to `max_len` entries (a drafter's own cache), and that sequence."""
    pool = model.make_pool(-(-max_len // block_size) + 1, block_size)  # a tensor-parallel model: on every rank
    return pool, SeqKV(pool)
