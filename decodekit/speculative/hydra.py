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

from .base import register
from .heads_common import (Frontier, HeadBatch, HeadBlock, HeadConfig, HeadDrafter, HeadLane, Pick, Target,
                           causal_mask, log_softmax, shifted, unpack_ints)
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
        return self.prefix(f, pos, None, causal_mask(n, f.device), n - 1)[0]

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

    def cache_block(self) -> HeadBlock | None:
        return self.head.prefix

    def trace_passes(self, start: int, n: int) -> list[tuple[int, int, dict]]:
        prefix = [(n, start, {"layers": 1, "logits": 0})] if self.head.prefix is not None else []  # no LM head
        rounds = [(self.branch, 0, {"layers": 0}) for _ in range(2, min(self.depth, len(self.head.heads)) + 1)]
        return [*prefix, (1, 0, {"layers": 0}), *rounds]  # an MLP head and the LM head per row

    def _pass(self, lane: HeadLane, feats: torch.Tensor, ints: torch.Tensor, length: int) -> torch.Tensor:
        head, target = self.head, self.target
        ids, start, n = unpack_ints(ints, feats.shape[0])
        c = feats if lane.cache is None else lane.cache.append(head.prefix, feats[None], start, length,
                                                               lane.max_position)[0]
        c = c.index_select(0, n - 1)  # the root's parent row: [1, H]
        root = target.embed(ids.index_select(0, n - 1)).to(c.dtype)  # the root token x_{t+1}
        root_lp = log_softmax(head.logits(target, head.head(0, c, [root])))[0]

        def expand(front: Frontier) -> torch.Tensor:  # head `depth` on each path: root, then the path's tokens
            k = front.tokens.shape[0]
            embeds = [root.expand(k, -1)] + [target.embed(front.paths[:, j]).to(c.dtype) for j in range(front.depth)]
            return log_softmax(head.logits(target, head.head(front.depth, c.expand(k, -1), embeds)))

        return self._grow(root_lp, expand, len(head.heads))
