"""What every press does inside the engine: one `PressState` per sequence, and the hooks the step calls.

The engine's step knows three things about a sequence's press, and nothing else:
- `observer(kv, positions, prefill)`: the press's part in this pass's attention for the sequence's row (None: plain
  attention, and every fast path: CUDA graphs, fused greedy chunks, the Triton decode kernel). The model calls
  `observer.attend(layer, q, keys, values, mask, scale)` in every layer (`models.transformer.observe_rows`); the
  step calls `observer.kept(nodes)` once it knows which of the row's tokens it keeps (the accepted path).
- `after_step(kv)`: after the step's tokens are committed: evict, quantize (the KV memory changes).
- `held_outside()`: bytes the press holds outside the pool (packed keys and values), for the stats.
`fork()` copies the state for another sample of the request, `reset()` forgets it when the sequence loses its KV
memory (preemption: it prefills again).
With sliding-window rings (`models/kv_cache.py`) presses see the full pool's layers: ring layers are not read by
`layer_kv`, and observed only for a press that says so (`observes_rings`: their attention columns are the ring's
entries, `RowObserver.ring_of`); eviction still compacts the rings (one entry set per sequence), quantization packs
the rings' entries too (`quantized.py`). `PressSpec.check_rings` refuses what cannot work that way.
"""
from __future__ import annotations

import copy

import torch

from ..attention import logits as attention_logits


class PressState:
    """Base: a press that takes no part in passes and never changes the memory (compression ratio 0)."""

    # Prefill passes are observed: the prompt's KV must be computed here, not adopted from the prefix cache.
    observes_prefill = False
    # Its rows are also observed in ring layers (whose columns are a ring's entries, `_attend_ring` in quantized.py).
    observes_rings = False

    def __init__(self, press, model, prompt_len: int) -> None:
        self.press, self.model, self.prompt_len = press, model, prompt_len
        self.config = model.config

    def observer(self, kv, positions: list[int], prefill: bool) -> "RowObserver | None":
        return None

    def observed(self, kv) -> bool:
        """Whether decode passes are observed now (the sequence then runs eagerly, on the masked attention path)."""
        return False

    def attend(self, obs: "RowObserver", layer: int, q, keys, values, mask, scale: float):
        return keys, values, mask

    def kept(self, obs: "RowObserver", nodes: list[int]) -> None:
        pass

    def after_step(self, kv) -> None:
        pass

    def held_outside(self) -> int:
        return 0

    def reset(self) -> None:
        pass

    def fork(self) -> "PressState":
        """A copy for another sample of the request: tensors copied, model and press shared."""
        twin = copy.copy(self)
        for name, value in vars(self).items():
            if name not in ("press", "model", "config"):
                setattr(twin, name, copy.deepcopy(value))
        return twin


class RowObserver:
    """One pass's row of one sequence: where its new tokens start (`ctx` entries before them) and their positions."""

    def __init__(self, state: PressState, ctx: int, positions: list[int], prefill: bool) -> None:
        self.state, self.ctx, self.positions, self.prefill = state, ctx, positions, prefill
        self.selection = None  # per-pass scratch of a press (TidalDecode's token selection between layers)
        self._query_positions: torch.Tensor | None = None
        self.scratch: dict = {}  # a press's per-pass cache (a quantizing press's ring chunks, dequantized once)
        # Ring layer -> (its ring, the ring's span), for a press that reads rings (`PressState.observes_rings`).
        self.ring_of: dict[int, tuple[int, int]] = {}

    def attend(self, layer: int, q, keys, values, mask, scale: float):
        return self.state.attend(self, layer, q, keys, values, mask, scale)

    def kept(self, nodes: list[int]) -> None:
        self.state.kept(self, nodes)

    def query_positions(self, width: int, device) -> torch.Tensor:
        """Positions of the row's `width` queries (padding queries repeat the last real one); made once a pass (a
        copy to the device in every layer would wait for the device each time)."""
        if self._query_positions is None or self._query_positions.shape[0] != width:
            pos = self.positions + [self.positions[-1]] * (width - len(self.positions))
            self._query_positions = torch.tensor(pos, device=device)
        return self._query_positions


def attention_weights(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scale: float,
                      chunk: int = 256) -> torch.Tensor:
    """Softmax attention `[H_kv, W, L]` of a row's queries `q` `[H, W, D]` over `keys` `[H_kv, L, D]` under `mask`
    (`[1 or H, W, L]`), summed over the query heads that share a key head; float32, `chunk` queries at a time."""
    h_kv = keys.shape[0]
    out = []
    for s in range(0, q.shape[1], chunk):
        w = attention_logits(q[:, s:s + chunk], keys, scale)
        w = w.masked_fill(~mask[:, s:s + chunk], float("-inf")).softmax(-1)
        out.append(w.reshape(h_kv, -1, *w.shape[1:]).sum(1))
    return torch.cat(out, dim=1)


def layer_kv(pool, kv, layer: int, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, ...]:
    """Keys, values `[H_kv, n, D]` and positions `[n]` of entries [start, end) of a sequence, in one layer."""
    if layer in getattr(pool, "ring_layers", ()):
        raise ValueError(f"layer {layer} keeps only its sliding window (a ring): its entries are not all held")
    end = kv.length if end is None else end
    slots = kv.slot_tensor(start=start, n=end - start)
    k_store, v_store = pool.layer_store(layer)
    return k_store[slots].transpose(0, 1), v_store[slots].transpose(0, 1), pool.slot_pos[slots]
