"""EAGLE: a one-layer head that autoregresses on the target's features (Li et al. 2024, EAGLE; EAGLE-2; EAGLE-3).

Row t of the head reads `fc(concat(embed(x_{t+1}), g_t))`, where `g_t` is the target's feature at t, runs one
decoder block, and outputs a feature from which the target's own LM head predicts `x_{t+2}`; drafting deeper feeds
that output back as the next row's `g`. Two feature kinds:
- EAGLE-1/2 (default): `g` = the target's final normed hidden state (what its LM head reads); the head's output
  regresses the next one (smooth-L1) and is scored by the LM head directly.
- EAGLE-3 (`fused=True` at training): `g` = a linear fusion of low, middle and high layers; the output goes through
  the head's own norm to the LM head, trained on tokens only, with training-time test (the head is unrolled over
  its own outputs for several steps during training, as at drafting time).
Drafting grows EAGLE-2's dynamic tree (`heads_common.grow_tree`): each round expands the `branch` most likely nodes
in one head pass with tree attention, and the `max_nodes` most likely nodes are verified; the whole draft is one
device pass (captured under CUDA graphs), copied to the host once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..models.transformer import RMSNorm
from .base import register
from .heads_common import (Frontier, HeadBatch, HeadBlock, HeadConfig, HeadDrafter, HeadLane, Pick, Target,
                           causal_mask, log_softmax, shifted, unpack_ints)


class EagleHead(nn.Module):
    """fc(concat(embed(next token), feature)) -> one decoder block -> next feature (pre LM head)."""

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        n_in = len(config.feature_layers)
        self.fuse = None if config.final_only else nn.Linear(n_in * h, h, bias=False)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.block = HeadBlock(config.block_config())
        self.norm = None if config.final_only else RMSNorm(h, config.rms_norm_eps)

    @staticmethod
    def default_config(model_config, fused: bool = False) -> HeadConfig:
        return HeadConfig.for_target("eagle", model_config, fused=fused)

    def features_in(self, feats: torch.Tensor) -> torch.Tensor:
        """The target's features (`feature_layers`, concatenated) -> the head's input feature `[.., H]`."""
        return feats if self.fuse is None else self.fuse(feats)

    def inputs(self, target: Target, g: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([target.embed(tokens).to(g.dtype), g], dim=-1))

    def logits(self, target: Target, h: torch.Tensor) -> torch.Tensor:
        return target.logits(h if self.norm is None else self.norm(h))

    def unroll(self, target: Target, batch: HeadBatch, steps: int, pick: Pick | None = None) -> list[torch.Tensor]:
        """Outputs `[B, T-1, H]` of draft steps 0..steps-1 on every row at once (row t at step k predicts
        `x_{t+2+k}`). Step k's row t sees the real rows <= t and its own outputs of steps 1..k, exactly what drafting
        from root t+1 sees (training-time test); its input token is the true `x_{t+1+k}`, or `pick(k-1, output)`
        (the head's own guesses, when scoring)."""
        tokens = batch.tokens
        n = tokens.shape[1] - 1
        dev = tokens.device
        pos = torch.arange(n, device=dev)[None].expand(tokens.shape[0], n)
        g = self.features_in(batch.feats[:, :-1])
        x = self.inputs(target, g, tokens[:, 1:])
        h, k, v = self.block(x, pos, None, causal_mask(n, dev), n - 1)
        keys, values, outs = [k], [v], [h]
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        for step in range(1, steps):
            nxt = shifted(tokens, 1 + step) if pick is None else pick(step - 1, outs[-1])
            x = self.inputs(target, outs[-1], nxt)
            mask = torch.cat([causal_mask(n, dev)[0, 0]] + [eye] * step, dim=1)[None, None]
            h, k, v = self.block(x, pos + step, (torch.cat(keys, 2), torch.cat(values, 2)), mask, n - 1 + step)
            keys.append(k)
            values.append(v)
            outs.append(h)
        return outs

    def feature_loss(self, outs: list[torch.Tensor], batch: HeadBatch, weights: list[torch.Tensor]
                     ) -> torch.Tensor:
        """EAGLE-1/2: smooth-L1 between step k's output and the target's real next feature f_{t+1+k}."""
        if self.norm is not None:  # EAGLE-3 trains on tokens only
            return outs[0].new_zeros(())
        total = outs[0].new_zeros(())
        for k, (h, w) in enumerate(zip(outs, weights)):
            want = shifted(batch.final, 1 + k).to(h.dtype)
            per_row = F.smooth_l1_loss(h, want, reduction="none").mean(-1)
            total = total + (per_row * w).sum() / w.sum().clamp_min(1)
        return total


def greedy_tokens(head: nn.Module, target: Target, h: torch.Tensor, rows: int = 512) -> torch.Tensor:
    """Argmax token of every row of `h` `[B, T, H]`, a few rows at a time (full-vocabulary logits are large)."""
    flat = h.reshape(-1, h.shape[-1])
    with torch.no_grad():
        out = torch.cat([head.logits(target, flat[i:i + rows]).argmax(-1) for i in range(0, flat.shape[0], rows)])
    return out.view(h.shape[:-1])


@register
@dataclass
class Eagle(HeadDrafter):
    """EAGLE-2 drafting with a trained EAGLE (or EAGLE-3) head (Li et al. 2024). Knobs: see `HeadDrafter`
    (`depth` 6, `branch` 8, `max_nodes` 60: EAGLE-2's defaults; `branch=1` drafts a chain)."""

    name = "eagle"
    module = EagleHead

    def cache_block(self) -> HeadBlock:
        return self.head.block

    def trace_passes(self, start: int, n: int) -> list[tuple[int, int, dict]]:
        # One decoder layer over the new rows with the LM head on the root's, then one per round over its frontier.
        rounds = [(self.branch, start + n + (d - 2) * self.branch, {"layers": 1, "tree": True})
                  for d in range(2, self.depth + 1)]
        return [(n, start, {"layers": 1, "logits": 1}), *rounds]

    def _pass(self, lane: HeadLane, feats: torch.Tensor, ints: torch.Tensor, length: int) -> torch.Tensor:
        """The head's rows for the new committed tokens (into its cache), then the tree: each round runs the
        frontier's rows in one block pass, each seeing the committed rows, its ancestors' rows and itself."""
        head, target, cache = self.head, self.target, lane.cache
        dev = feats.device
        ids, start, n = unpack_ints(ints, feats.shape[0])
        x = head.inputs(target, head.features_in(feats[None]), ids[None])
        root = cache.append(head.block, x, start, length, lane.max_position)[0].index_select(0, n - 1)  # [1, H]
        base = start + n  # committed rows; the root's row is base - 1, a depth-d node sits at position base - 1 + d
        committed = torch.arange(length, device=dev) < base
        keys, values = [cache.k[:, :, :length]], [cache.v[:, :, :length]]  # + each round's rows
        state = {"out": root, "seen": torch.zeros(1, 0, dtype=torch.bool, device=dev)}  # the last round's rows

        def expand(front: Frontier) -> torch.Tensor:
            k = front.tokens.shape[0]
            g = state["out"].index_select(0, front.parent)  # each node reads its parent's output
            seen = torch.cat([state["seen"].index_select(0, front.parent),  # its ancestors' rows, and its own
                              torch.eye(k, dtype=torch.bool, device=dev)], dim=1)
            mask = torch.cat([committed.expand(k, length), seen], dim=1)[None, None]
            pos = (base + front.depth - 1).expand(1, k)
            out, kk, vv = head.block(head.inputs(target, g[None], front.tokens[None]), pos,
                                     (torch.cat(keys, 2), torch.cat(values, 2)), mask, lane.max_position)
            keys.append(kk)
            values.append(vv)
            state["out"], state["seen"] = out[0], seen
            return log_softmax(head.logits(target, out[0]))

        return self._grow(log_softmax(head.logits(target, root))[0], expand, self.depth)
