"""A preallocated KV cache with a batch dimension: append, rollback, and keep-one-path-of-a-tree.

The cache is static (sized once), which is what lets the decode step be captured as a CUDA graph. Every row of
the batch shares the same slot count `length`; left padding is expressed by `slot_pos = -1` (a slot no query may
attend to), so rows of different prompt lengths decode in lockstep.
"""
from __future__ import annotations

import torch
from torch import nn

EMPTY = -1  # slot_pos of a slot that holds no token (not yet written, or padding)


class KVCache(nn.Module):
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> None:
        super().__init__()
        shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # Position (in its own sequence) of the token held by each slot; attention masks derive from it.
        self.register_buffer("slot_pos", torch.full((batch_size, max_len), EMPTY, device=device), persistent=False)
        self.max_len = max_len
        self.length = 0  # slots in use, the same for every row

    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    def reset(self) -> None:
        self.slot_pos.fill_(EMPTY)
        self.length = 0

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} tokens > {self.max_len} slots (context window)")

    def rollback(self, length: int) -> None:
        """Forget every slot from `length` on (rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to {length}: cache holds {self.length}")
        self.slot_pos[:, length : self.length] = EMPTY
        self.length = length

    def keep_path(self, start: int, nodes: list[int]) -> None:
        """After a tree forward written at slots `start...`, keep only the tree nodes `nodes` (in path order).

        The kept nodes are moved to slots start, start+1, ... so the cache again holds one contiguous sequence.
        """
        nodes = list(nodes)
        n = len(nodes)
        if nodes != list(range(n)):  # decided on the host: no device sync on the common chain path
            src = torch.tensor(nodes, dtype=torch.long, device=self.k.device) + start
            dst = torch.arange(start, start + n, device=self.k.device)
            self.k[:, :, :, dst] = self.k[:, :, :, src]
            self.v[:, :, :, dst] = self.v[:, :, :, src]
            self.slot_pos[:, dst] = self.slot_pos[:, src]
        self.slot_pos[:, start + n : self.length] = EMPTY
        self.length = start + n
