"""Any other causal LM through transformers' AutoModelForCausalLM, behind the native runtime's interface.

Slower than the native runtime (no graph capture) but exact: the model's keys and values live in decodekit's paged
pool through a transformers `Cache` whose layers write at the pass's slots and hand back each row's entries
(`PagedLayer`), and the same masks (committed entries, ancestors inside a token tree) reach transformers as a 4D
attention mask, so every decoding method and batching works.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .batch import ForwardBatch
from .kv_cache import KVPool, SeqKV
from .transformer import Transformer, attention_mask


@dataclass
class HFConfig:
    vocab_size: int
    max_position_embeddings: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    eos_token_ids: list[int] = field(default_factory=list)
    model_type: str = "hf"


class PagedLayer(CacheLayerMixin):
    """One layer's keys and values in the pool: `update` writes the group's new tokens at their slots and returns
    every entry the group's rows may read, `[rows, kv_heads, L, head_dim]`."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, write_slots: torch.Tensor, table: torch.Tensor) -> None:
        super().__init__()
        self.k_store, self.v_store, self.write_slots, self.table = k, v, write_slots, table
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # the pool exists already
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        rows, heads, width, dim = key_states.shape
        self.k_store.index_copy_(0, self.write_slots, key_states.transpose(1, 2).reshape(-1, heads, dim))
        self.v_store.index_copy_(0, self.write_slots, value_states.transpose(1, 2).reshape(-1, heads, dim))
        return self.k_store[self.table].transpose(1, 2), self.v_store[self.table].transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.table.shape[1], 0

    def get_seq_length(self) -> int:
        return self.table.shape[1]

    def get_max_length(self) -> int:
        return -1


class HFModel(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.hf = model
        c = model.config
        eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
        heads = c.num_attention_heads
        self.config = HFConfig(c.vocab_size, getattr(c, "max_position_embeddings", 2048), c.num_hidden_layers,
                               getattr(c, "num_key_value_heads", None) or heads,
                               getattr(c, "head_dim", None) or c.hidden_size // heads,
                               [e for e in eos if e is not None], c.model_type)

    @classmethod
    def from_folder(cls, folder: Path, device: torch.device, dtype: torch.dtype) -> "HFModel":
        from transformers import AutoModelForCausalLM

        return cls(AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval())

    @property
    def device(self) -> torch.device:
        return self.hf.device

    @property
    def dtype(self) -> torch.dtype:
        return self.hf.dtype

    def make_pool(self, num_blocks: int, block_size: int) -> KVPool:
        c = self.config
        return KVPool(c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, self.dtype, self.device)

    def forward(self, batch: ForwardBatch, pool: KVPool, skip_layers=frozenset(), compiled: bool = False):
        if skip_layers or batch.hidden_layers:
            raise NotImplementedError("the transformers fallback does not skip layers or return hidden states")
        pool.slot_pos.index_copy_(0, batch.write_slots, batch.positions)
        logits = []
        for g in batch.groups:  # transformers sees one dense [rows, width] batch per group
            flat = slice(g.start, g.start + g.rows * g.width)
            positions = batch.positions[flat].view(g.rows, g.width)
            allowed = attention_mask(g, positions, None, None)
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            cache = Cache(layers=[PagedLayer(pool.k[i], pool.v[i], batch.write_slots[flat], g.slot_table)
                                  for i in range(self.config.num_layers)])
            out = self.hf(input_ids=batch.tokens[flat].view(g.rows, g.width), position_ids=positions,
                          attention_mask=mask, past_key_values=cache, use_cache=True)
            logits.append(out.logits.reshape(g.rows * g.width, -1))
        logits = torch.cat(logits)
        return logits if batch.logit_rows is None else logits[batch.logit_rows]

    forward_seq = Transformer.forward_seq  # one sequence's pass: the same function over this forward
