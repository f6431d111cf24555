"""Medusa: parallel draft heads on the target's last hidden state (Cai et al. 2024, Medusa).

Head k (0-based) is a residual block `f + SiLU(W_k f + b_k)` on the target's final normed feature `f_t`, read by the
target's own LM head, and predicts `x_{t+2+k}` directly, independently of the other heads' tokens (Medusa-1's
frozen-backbone heads; the LM head is shared rather than copied per head, which keeps the weights small). `W_k`
starts at zero, so an untrained head repeats the target's next-token guess. `mix_heads` (Amphista, Li et al.
2024): a bi-directional attention layer across the heads' states at each position lets them see each other.
Drafting: the tree of most likely token combinations (`heads_common.grow_tree`; the heads' distributions do not
depend on the path, so each depth's children are the same top tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import register
from .heads_common import Frontier, HeadBatch, HeadBlock, HeadConfig, HeadDrafter, HeadLane, Target, log_softmax, \
    unpack_ints


class ResBlock(nn.Module):
    def __init__(self, size: int, in_size: int | None = None) -> None:
        super().__init__()
        self.linear = nn.Linear(in_size or size, size)
        nn.init.zeros_(self.linear.weight)  # starts as the identity on the residual: the target's own guess
        nn.init.zeros_(self.linear.bias)

    def forward(self, residual: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return residual + nn.functional.silu(self.linear(residual if x is None else x))


class MedusaHeads(nn.Module):
    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        self.heads = nn.ModuleList(ResBlock(config.hidden_size) for _ in range(config.num_draft_heads))
        self.mix = HeadBlock(config.block_config()) if config.mix_heads else None

    @staticmethod
    def default_config(model_config, **overrides) -> HeadConfig:
        return HeadConfig.for_target("medusa", model_config, **overrides)

    def states(self, f: torch.Tensor) -> torch.Tensor:
        """`f` `[..., H]` -> every head's state `[..., K, H]`."""
        out = torch.stack([head(f) for head in self.heads], dim=-2)
        if self.mix is not None:
            flat = out.reshape(-1, *out.shape[-2:])
            k = flat.shape[1]
            pos = torch.arange(k, device=f.device)[None].expand(flat.shape[0], k)
            full = torch.ones(1, 1, k, k, dtype=torch.bool, device=f.device)
            out = self.mix(flat, pos, None, full, k - 1)[0].view(out.shape)
        return out

    def logits(self, target: Target, h: torch.Tensor) -> torch.Tensor:
        return target.logits(h)

    def unroll(self, target: Target, batch: HeadBatch, steps: int, pick=None) -> list[torch.Tensor]:
        """Outputs `[B, T-1, H]` of heads 0..steps-1 (row t, head k predicts `x_{t+2+k}`; no head reads another's
        token, so `pick` is never called)."""
        states = self.states(batch.feats[:, :-1])
        return [states[..., k, :] for k in range(min(steps, len(self.heads)))]

    def feature_loss(self, outs, batch, weights) -> torch.Tensor:
        return outs[0].new_zeros(())


@register
@dataclass
class Medusa(HeadDrafter):
    """Tree drafting with trained Medusa heads (Cai et al. 2024). Knobs: see `HeadDrafter` (`depth` is capped by the
    number of heads)."""

    name = "medusa"
    module = MedusaHeads
    depth: int = 4
    branch: int = 8
    max_nodes: int = 48

    def trace_passes(self, start: int, n: int) -> list[tuple[int, int, dict]]:
        return [(len(self.head.heads), 0, {"layers": 0})]  # K MLP heads and the LM head, one row each

    def _pass(self, lane: HeadLane, feats: torch.Tensor, ints: torch.Tensor, length: int) -> torch.Tensor:
        _, _, n = unpack_ints(ints, feats.shape[0])
        states = self.head.states(feats.index_select(0, n - 1))[0]  # the root's parent row: [K, H]
        lps = log_softmax(self.head.logits(self.target, states))  # [K, V]: head k drafts depth k + 1

        def expand(front: Frontier) -> torch.Tensor:
            return lps[front.depth].expand(front.tokens.shape[0], -1)

        return self._grow(lps[0], expand, lps.shape[0])
