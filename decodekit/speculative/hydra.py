"""Hydra: sequentially dependent draft heads (Ankner et al. 2024, Hydra; Hydra++).

Head k (0-based) predicts `x_{t+2+k}` from the target's feature and the tokens drafted before it:
`c_t + SiLU(W_k concat(c_t, embed(x_{t+1}), ..., embed(x_{t+1+k})))`, read by the target's own LM head. `c_t` is the
target's final normed feature, or (Hydra++'s prefix layer, the default) the output of one attention layer over the
target's features up to t. The heads' dependence on the path is Clover's regressive connection as well. `W_k`
starts at zero, so an untrained head repeats the target's next-token guess.
Drafting: EAGLE-2's dynamic tree (`heads_common.grow_tree`); each round runs the next head on the `branch` most
likely paths.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import DraftTree, register
from .heads_common import (HeadBatch, HeadBlock, HeadCache, HeadConfig, HeadDrafter, Pick, Target, ancestors,
                           causal_mask, log_softmax, shifted)
from .medusa import ResBlock


class HydraHeads(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.prefix = HeadBlock(config.block_config()) if config.prefix_layer else None
        self.heads = nn.ModuleList(ResBlock(h, (k + 2) * h) for k in range(config.num_draft_heads))

    @staticmethod
    def default_config(model_config, **overrides) -> HeadConfig:
        return HeadConfig.for_target("hydra", model_config, **overrides)

    def head(self, k: int, c: torch.Tensor, embeds: list[torch.Tensor]) -> torch.Tensor:
        return self.heads[k](c, torch.cat([c, *embeds], dim=-1))

    def logits(self, target: Target, h: torch.Tensor) -> torch.Tensor:
        return target.logits(h)

    def context(self, f: torch.Tensor) -> torch.Tensor:
        """`c` of every row of `f` `[B, T, H]` (causal prefix layer, or `f` itself)."""
        if self.prefix is None:
            return f
        n = f.shape[1]
        pos = torch.arange(n, device=f.device)[None].expand(f.shape[0], n)
        return self.prefix(f, pos, None, causal_mask(n, f.device))[0]

    def unroll(self, target: Target, batch: HeadBatch, steps: int, pick: Pick | None = None) -> list[torch.Tensor]:
        """Outputs `[B, T-1, H]` of heads 0..steps-1; head k reads the true path, or `pick(k-1, output)`."""
        c = self.context(batch.feats[:, :-1])
        embeds = [target.embed(batch.tokens[:, 1:]).to(c.dtype)]
        outs = []
        for k in range(min(steps, len(self.heads))):
            if k:
                nxt = shifted(batch.tokens, 1 + k) if pick is None else pick(k - 1, outs[-1])
                embeds.append(target.embed(nxt).to(c.dtype))
            outs.append(self.head(k, c, embeds))
        return outs

    def feature_loss(self, outs, batch, weights) -> torch.Tensor:
        return outs[0].new_zeros(())


@register
@dataclass
class Hydra(HeadDrafter):
    """Tree drafting with trained Hydra heads (Ankner et al. 2024). Knobs: see `HeadDrafter` (`depth` is capped by
    the number of heads)."""

    name = "hydra"
    module = HydraHeads
    depth: int = 4
    branch: int = 8
    max_nodes: int = 48

    def _reset_state(self, prompt_len: int) -> None:
        self.cache = None
        if self.head.prefix is not None:
            size = self.engine.max_context + 2
            self.cache = HeadCache(self.head.prefix.config, size, self.target.model.dtype, self.target.model.device)

    def _context(self, context: list[int]) -> torch.Tensor:
        end = len(context) - 1
        if self.cache is None:
            return self.features[end - 1]
        start = self.cache.length = min(self.cache.length, end - 1)
        dev = self.target.model.device
        self.note_pass("head", end - start, start, layers=1, logits=0)  # the prefix layer: no LM head
        out = self.cache.run(self.head.prefix, self.features[start:end][None],
                             torch.arange(start, end, device=dev)[None], start=start)
        self.cache.length = end
        return out[0, -1]

    def _draft(self, context: list[int]) -> DraftTree:
        head, target = self.head, self.target
        c = self._context(context)
        embed = lambda ids: target.embed(torch.tensor(ids, device=c.device)).to(c.dtype)  # noqa: E731
        root = embed([context[-1]])[0]
        self.note_pass("head", 1, 0, layers=0)  # an MLP head and the LM head, per row
        root_lp = log_softmax(head.logits(target, head.head(0, c, [root])))

        def expand(frontier: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
            paths = [[tokens[a - 1] for a in reversed([n, *ancestors(parents, n)])] for n in frontier]
            k = len(paths[0])
            self.note_pass("head", len(frontier), 0, layers=0)
            rows = torch.stack([embed(p) for p in paths])  # [F, k, H]
            cs = c.expand(len(frontier), -1)
            embeds = [root.expand(len(frontier), -1)] + [rows[:, j] for j in range(k)]
            return log_softmax(head.logits(target, head.head(k, cs, embeds)))

        return self._grow(root_lp, expand, len(head.heads))
