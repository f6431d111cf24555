"""Decode-time sparse attention in the paged cache: TidalDecode and Quest choose, per query head, which committed
entries a decode step reads; nothing is evicted.

They act through the attention mask of the sequence's row (`attend` returns a per-head mask `[H, W, L]`): entries
committed before the step (`ctx`) are visible only where the press selects them; the step's own tokens (root and
draft) stay visible as before, and the sliding window still applies. The token budget per head is the press's
`token_budget` if given, else `kept_count(ctx, R)` with the request's compression ratio (R = 0: every entry).
Prefill passes attend fully, as in both papers; so do sliding-window layers (Gemma 3's local layers), which
read only their window anyway: the budget applies to the full-attention layers. The mask makes the result exact to the method; the speed a sparse
kernel would gain is not measured here (the masked path still reads every entry).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..base import kept_count
from ..presses.quest import QuestPress
from ..presses.tidal import TidalDecode
from .state import PressState, RowObserver


class SparseState(PressState):
    def __init__(self, press, model, prompt_len: int, ratio: float, budget: int | None) -> None:
        super().__init__(press, model, prompt_len)
        self.ratio, self.budget = ratio, budget
        self.active = budget is not None or ratio > 0

    def observed(self, kv) -> bool:
        return self.active

    def observer(self, kv, positions: list[int], prefill: bool) -> RowObserver | None:
        return RowObserver(self, kv.length, positions, prefill) if self.active and not prefill else None

    def tokens(self, ctx: int) -> int:
        return self.budget if self.budget is not None else kept_count(ctx, self.ratio)

    def attend(self, obs: RowObserver, layer: int, q, keys, values, mask, scale: float):
        ctx = obs.ctx
        budget = self.tokens(ctx)
        if budget >= ctx:
            return keys, values, mask
        # A sliding-window layer reads its window only: it is sparse already and stays as it is (a TidalDecode
        # selection layer there still selects, for the layers after it).
        windowed = self.config.layer_window(layer) is not None
        if isinstance(self.press, TidalDecode):
            chosen = self._tidal(obs, layer, q, keys[:, :ctx], budget)
        else:
            chosen = None if windowed else self._quest(obs, layer, q, keys[:, :ctx], budget)
        if chosen is None or windowed:
            return keys, values, mask
        heads, width, length = q.shape[0], mask.shape[1], mask.shape[2]
        visible = torch.zeros(heads, length, dtype=torch.bool, device=mask.device)
        visible[:, :ctx] = chosen
        visible[:, ctx:] = True
        return keys, values, mask & visible[:, None, :]

    def _tidal(self, obs: RowObserver, layer: int, q, keys, budget: int) -> torch.Tensor | None:
        """`[H, ctx]` bool: the tokens of the latest selection layer (a selection layer itself attends fully)."""
        role = self.press.role(layer)
        if role == "select":
            selected = replace(self.press, token_budget=budget).select(q[:, :len(obs.positions)], keys)
            obs.selection = torch.zeros(q.shape[0], keys.shape[1], dtype=torch.bool, device=keys.device)
            obs.selection.scatter_(1, selected, True)
            return None
        if role == "dense" or obs.selection is None:
            return None
        return obs.selection

    def _quest(self, obs: RowObserver, layer: int, q, keys, budget: int) -> torch.Tensor | None:
        press: QuestPress = self.press
        if layer < press.dense_layers:
            return None
        pages = replace(press, token_budget=budget).select(q[:, :len(obs.positions)], keys)  # [H, n] page ids
        chosen = torch.zeros(q.shape[0], math.ceil(keys.shape[1] / press.page_size), dtype=torch.bool,
                             device=keys.device)
        chosen.scatter_(1, pages, True)
        return chosen.repeat_interleave(press.page_size, dim=1)[:, :keys.shape[1]]
