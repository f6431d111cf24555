"""Eviction presses in the paged cache: choose the tokens a sequence keeps, compact its block table, free the rest.

A sequence has one block table for all layers and heads, so eviction keeps ONE token set per sequence:
- a scorer press (`streaming_llm`, `h2o`, `snapkv`, `knorm`, `ems`) scores each token per layer as it does alone
  (the mean over heads, kvpress's rule); the layers' scores are turned into ranks and the mean rank over the
  scoring layers decides (ranks: a layer whose scores are larger, e.g. key norms, does not outvote the others).
  On a model with sliding-window layers (Gemma 3) only the full-attention layers score: the window layers never
  read old tokens, so what they would say about them is noise. With one scoring layer this is the press's own
  `select`.
- `scope` keeps its two budgets, each side chosen the same way by its own scorer;
- `ems` still merges: each layer's heads fold their evicted tokens into their copy of the kept ones.
Kept entries move to the front (`SeqKV.compact`: each keeps its position, freed blocks return to the pool).

When: once the prompt is prefilled (to `kept_count(prompt, R)` entries), and, with `compress_every` > 0, during
decoding whenever the entries held exceed the target (`kept_count(tokens written, R)`, or scope's budgets) by
`compress_every`. What a press needs is gathered on the way: the queries of the prompt's last `window_size` tokens
(SnapKV, EMS, SCOPE's SnapKV side) and, for H2O / EMS / SCOPE's H2O side, each entry's accumulated attention
from every committed query (prompt and output; a draft token's query counts once it is accepted).
"""
from __future__ import annotations

import torch

from ..base import LayerKV, ScorerPress, kept_count
from ..presses.ems import EMSPress, global_local_scores
from ..presses.h2o import H2OPress
from ..presses.scope import ScopePress
from ..presses.snapkv import SnapKVPress
from .state import PressState, RowObserver, attention_weights, layer_kv

# Presses that keep a budget while decoding (their paper evicts as the output grows); the others press the prompt.
DECODE_PRESSES = ("streaming_llm", "h2o", "scope")
DEFAULT_EVERY = 32


def needs_mass(press) -> bool:
    if isinstance(press, ScopePress):
        return needs_mass(press.prefill) or needs_mass(press.decode)
    return isinstance(press, (H2OPress, EMSPress))


def query_window(press) -> int:
    """Prompt tokens whose queries the press reads (0: none)."""
    if isinstance(press, ScopePress):
        return query_window(press.prefill)
    return press.window_size if isinstance(press, (SnapKVPress, EMSPress)) else 0


def rank(scores: torch.Tensor) -> torch.Tensor:
    """`[L]` rank of each score (0 = lowest), ties by index."""
    order = scores.argsort(stable=True)
    out = torch.empty_like(order)
    out[order] = torch.arange(order.numel(), device=order.device)
    return out


def select_shared(layers: list[LayerKV], scorer: ScorerPress, n_keep: int) -> torch.Tensor:
    """Sorted indices `[n_keep]` of one token set for every layer and head: the top mean rank over `layers` of the
    scorer's per-token score (its mean over heads)."""
    n = layers[0].length
    if n_keep >= n:
        return torch.arange(n, device=layers[0].keys.device)
    total = torch.zeros(n, dtype=torch.float64, device=layers[0].keys.device)
    for kv in layers:
        total += rank(scorer.score(kv, n_keep).double().mean(dim=0)).double()
    return total.topk(n_keep).indices.sort().values


class EvictionState(PressState):
    def __init__(self, press, model, prompt_len: int, ratio: float, every: int,
                 scope_budgets: tuple[int, int] | None = None, budget: int | None = None) -> None:
        super().__init__(press, model, prompt_len)
        self.ratio, self.every = ratio, every
        self.budgets = scope_budgets  # scope: (prompt, generated) slots
        self.budget = budget  # entries kept, instead of a ratio (a drafter's fixed-size cache)
        c = self.config
        windowed = [i for i in range(c.num_layers) if c.layer_window(i) is not None]
        self.score_layers = [i for i in range(c.num_layers) if i not in windowed] or list(range(c.num_layers))
        # EMS merges in every layer (with each layer's scores); the others need their inputs where they score.
        self.track = list(range(c.num_layers)) if isinstance(press, EMSPress) else self.score_layers
        self.window = query_window(press)
        self.mass_on = needs_mass(press)
        self.observes_prefill = bool(self.window or self.mass_on)
        inactive = ratio == 0 and scope_budgets is None and budget is None
        if inactive:  # keeps everything: no inputs to gather, no pass to observe
            self.observes_prefill = self.mass_on = False
            self.window = 0
        self.inactive = inactive
        self.reset()

    def reset(self) -> None:
        self.pressed_prompt = False
        self.queries: dict[int, list[torch.Tensor]] = {}  # layer -> pieces of the window's queries [H, w, D]
        self.mass: torch.Tensor | None = None  # [tracked layers, H_kv, entries]: attention each entry received
        self.pending: dict[int, torch.Tensor] = {}  # layer -> this pass's weights [H_kv, W, ctx + W] (decode rows)

    # ---- passes -------------------------------------------------------------------------------------------
    def observer(self, kv, positions: list[int], prefill: bool) -> RowObserver | None:
        if prefill and self.observes_prefill or not prefill and self.observed(kv):
            return RowObserver(self, kv.length, positions, prefill)
        return None

    def observed(self, kv) -> bool:
        return self.mass_on

    def attend(self, obs: RowObserver, layer: int, q, keys, values, mask, scale: float):
        if layer not in self.track:
            return keys, values, mask
        width = len(obs.positions)
        if obs.prefill and self.window:
            first = self.prompt_len - self.window
            take = [j for j, p in enumerate(obs.positions) if p >= first]
            if take:
                self.queries.setdefault(layer, []).append(q[:, take].float())
        if self.mass_on:
            end = obs.ctx + width
            w = attention_weights(q[:, :width], keys[:, :end], mask[:, :width, :end], scale)  # [H_kv, width, end]
            if obs.prefill:  # every prompt query is committed
                self._add_mass(layer, obs.ctx, w.sum(dim=1))
            else:
                self.pending[layer] = w
        return keys, values, mask

    def kept(self, obs: RowObserver, nodes: list[int]) -> None:
        """A decode row's accepted path: the attention of those queries counts; kept draft nodes move into place."""
        ctx = obs.ctx
        cols = list(range(ctx)) + [ctx + i for i in nodes]
        for layer, w in self.pending.items():
            self._add_mass(layer, ctx, w[:, nodes][:, :, cols].sum(dim=1))
        self.pending = {}

    def _add_mass(self, layer: int, ctx: int, received: torch.Tensor) -> None:
        """Entries before `ctx` gain `received[:, :ctx]`; entries from `ctx` on are new and start from theirs."""
        end = received.shape[1]
        t = self.track.index(layer)
        held = 0 if self.mass is None else self.mass.shape[2]
        if held < end:  # grow geometrically: a decode step adds one entry
            grown = torch.zeros(len(self.track), received.shape[0], max(end, 2 * held), device=received.device)
            if self.mass is not None:
                grown[:, :, :held] = self.mass
            self.mass = grown
        self.mass[t, :, :ctx] += received[:, :ctx]
        self.mass[t, :, ctx:end] = received[:, ctx:]

    # ---- pressing -----------------------------------------------------------------------------------------
    def after_step(self, kv) -> None:
        if self.inactive or kv.written < self.prompt_len:
            return
        if not self.pressed_prompt:
            self.pressed_prompt = True
            self.compress(kv, at_prefill=True)
            self.queries = {}  # the window's queries describe the prompt's end only
        elif self.every and kv.length > self.target(kv) + self.every:
            self.compress(kv, at_prefill=False)

    def target(self, kv) -> int:
        if self.budgets is not None:
            return sum(self.budgets)
        if self.budget is not None:
            return self.budget
        return kept_count(kv.written, self.ratio)

    def layer_inputs(self, kv, layer: int, at_prefill: bool) -> LayerKV:
        pool = kv.pool
        keys, values, positions = layer_kv(pool, kv, layer)
        queries = None
        if at_prefill and layer in self.queries:
            queries = torch.cat(self.queries[layer], dim=1).to(keys.dtype)
        mass = None
        if self.mass is not None and layer in self.track:
            mass = self.mass[self.track.index(layer), :, :kv.length]
        return LayerKV(keys, values, positions, queries, mass, self.prompt_len)

    def compress(self, kv, at_prefill: bool) -> None:
        rings = getattr(kv.pool, "ring_layers", frozenset())  # a ring keeps its window only: no scores, no merge
        layers = {i: self.layer_inputs(kv, i, at_prefill) for i in self.track if i not in rings}
        scoring = [layers[i] for i in self.score_layers]
        if isinstance(self.press, ScopePress):
            keep = self._scope(scoring)
        else:
            at_most = self.budget if self.budget is not None else kept_count(kv.length, self.ratio)
            keep = select_shared(scoring, self.press, at_most if at_prefill else self.target(kv))
        if keep.numel() == kv.length:
            return
        merged = self._merge(layers, keep) if isinstance(self.press, EMSPress) else {}
        kv.compact(keep)
        if self.mass is not None:
            self.mass = self.mass[:, :, keep].contiguous()
        slots = kv.slot_tensor() if merged else None
        for layer, (k, v) in merged.items():  # after compacting: the kept entries now sit in blocks it owns alone
            k_store, v_store = kv.pool.layer_store(layer)
            k_store[slots] = k.transpose(0, 1)
            v_store[slots] = v.transpose(0, 1)

    def _scope(self, layers: list[LayerKV]) -> torch.Tensor:
        """SCOPE's selection with one token set: each side among its own tokens, by its own scorer and budget."""
        press, parts = self.press, []
        is_prompt = layers[0].positions < layers[0].prompt_len
        for mask, scorer, budget in ((is_prompt, press.prefill, self.budgets[0]),
                                     (~is_prompt, press.decode, self.budgets[1])):
            idx = mask.nonzero()[:, 0]
            if idx.numel() > budget:
                side = [kv.gather(idx) for kv in layers]
                idx = idx[select_shared(side, scorer, budget)] if budget else idx[:0]
            parts.append(idx)
        return torch.cat(parts).sort().values

    def _merge(self, layers: dict[int, LayerKV], keep: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        out = {}
        for i, kv in layers.items():
            if kv.queries is None or kv.attn_mass is None:
                continue  # no scores for this layer (decode-time pressing): plain eviction
            kept = keep.expand(kv.keys.shape[0], -1)
            out[i] = self.press.merge(kv, kept, global_local_scores(kv, self.press.scale))
        return out
