"""TidalDecode: position-persistent sparse attention. A few selection layers attend fully and pick each head's
top-k token positions; the layers after them attend only to those positions.

Yang et al., "TidalDecode: Fast and Accurate LLM Decoding with Position Persistent Sparse Attention"
(arXiv 2410.05076). The tokens with the highest attention overlap strongly across consecutive layers, so selection
runs only at `selection_layers` (the paper: one early layer and one re-selection layer in the middle, e.g. layer 13
of Llama-3-8B); layers below `dense_layers` attend fully and select nothing. A selection layer's own output is full
attention. Selection is per query head (as the reference selector: top-k of each head's attention weights), summed
over the step's queries when it scores several tokens at once. Nothing is evicted: this decides what a decode step
reads from the cache. The engine keeps the latest selection between layers (`role` says what each layer does).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import attend, attend_selected, logits
from ..base import Press, register


@register
@dataclass
class TidalDecode(Press):
    name = "tidal"
    token_budget: int = 256  # tokens each query head attends to in sparse layers
    dense_layers: int = 2  # layers 0 .. dense_layers - 1 attend fully
    selection_layers: tuple[int, ...] = (2, 13)  # layers that attend fully and (re)select
    scale: float | None = None  # attention scale; None = 1/sqrt(head_dim)

    def __post_init__(self) -> None:
        if self.token_budget < 1:
            raise ValueError(f"token_budget must be >= 1, got {self.token_budget}")
        if not self.selection_layers or min(self.selection_layers) > self.dense_layers:
            raise ValueError(f"the first selection layer must come right after the dense layers (<= "
                             f"{self.dense_layers}), got {self.selection_layers}: a sparse layer would have no "
                             "selection")

    def role(self, layer: int) -> str:
        """'select' (full attention, then pick tokens), 'dense' (full attention) or 'sparse' (selected tokens)."""
        if layer in self.selection_layers:
            return "select"
        return "dense" if layer < self.dense_layers else "sparse"

    def select(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Sorted token indices `[H_q, min(token_budget, L)]`: each query head's highest attention weights."""
        weights = logits(queries, keys, self.scale).softmax(dim=-1).sum(dim=1)  # [H_q, L]
        k = min(self.token_budget, keys.shape[1])
        return weights.topk(k, dim=-1).indices.sort(dim=-1).values

    def attend(self, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               indices: torch.Tensor | None) -> torch.Tensor:
        """A layer's attention output `[H_q, T, D]`: over `indices` if given (a sparse layer), else over all."""
        if indices is None:
            return attend(queries, keys, values, scale=self.scale)
        return attend_selected(queries, keys, values, indices, self.scale)
