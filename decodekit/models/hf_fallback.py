"""Any other causal LM through transformers' AutoModelForCausalLM, behind the native runtime's interface.

Slower than the native runtime (dynamic cache, no graph capture) but exact: the same masks (derived from slot
positions, ancestors for trees) are passed to transformers as a 4D attention mask, so every decoding method runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .kv_cache import EMPTY
from .transformer import attention_mask


@dataclass
class HFConfig:
    vocab_size: int
    max_position_embeddings: int
    eos_token_ids: list[int] = field(default_factory=list)
    model_type: str = "hf"


class HFCache:
    """The bookkeeping the engine expects (length, slot positions, rollback, keep_path) over a DynamicCache."""

    def __init__(self, batch_size: int, max_len: int, device: torch.device) -> None:
        from transformers import DynamicCache

        self.kv = DynamicCache()
        self.max_len, self.length = max_len, 0
        self.slot_pos = torch.full((batch_size, max_len), EMPTY, device=device)

    @property
    def batch_size(self) -> int:
        return self.slot_pos.shape[0]

    def check_room(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {n} tokens > {self.max_len} slots (context window)")

    def rollback(self, length: int) -> None:
        self.keep_path(length, [])

    def keep_path(self, start: int, nodes) -> None:
        nodes = torch.as_tensor(nodes, dtype=torch.long, device=self.slot_pos.device)
        keep = torch.cat([torch.arange(start, device=nodes.device), start + nodes])
        for layer in self.kv.layers:
            layer.keys, layer.values = layer.keys[:, :, keep], layer.values[:, :, keep]
        n = start + nodes.numel()
        self.slot_pos[:, :n] = self.slot_pos[:, keep]
        self.slot_pos[:, n:] = EMPTY
        self.length = n


class HFModel(torch.nn.Module):
    def __init__(self, model) -> None:
        super().__init__()
        self.hf = model
        c = model.config
        eos = c.eos_token_id if isinstance(c.eos_token_id, list) else [c.eos_token_id]
        self.config = HFConfig(c.vocab_size, getattr(c, "max_position_embeddings", 2048), [e for e in eos if e is not None],
                               c.model_type)
        self.cache: HFCache | None = None

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

    def setup_cache(self, batch_size: int, max_len: int) -> HFCache:
        self.cache = HFCache(batch_size, min(max_len, self.config.max_position_embeddings), self.device)
        return self.cache

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor | None = None,
                num_logits: int | None = None, **unsupported) -> torch.Tensor:
        if unsupported:
            raise NotImplementedError(f"the transformers fallback does not support {', '.join(unsupported)}")
        cache = self.cache
        t = input_ids.shape[1]
        cache.check_room(t)
        start = cache.length
        cache.slot_pos[:, start:start + t] = positions
        allowed = attention_mask(cache.slot_pos[:, :start + t], positions, start, tree_mask, None)
        # Fully masked rows (padding queries) would turn softmax into NaN: let them see themselves.
        allowed = allowed | ~allowed.any(-1, keepdim=True) & (torch.arange(start + t, device=allowed.device)
                                                               == start + torch.arange(t, device=allowed.device)[:, None])
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.hf(input_ids=input_ids, position_ids=positions, attention_mask=mask, past_key_values=cache.kv,
                      use_cache=True, logits_to_keep=num_logits or 0)
        cache.length = start + t
        return out.logits
