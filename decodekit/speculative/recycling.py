"""Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating Inference of Large Language Models
with Token Recycling").

Every verify pass computes the target's distribution at every draft node, and most of it is thrown away. Token
Recycling keeps, for each token, the target's top-k next tokens the last time that token was scored (an adjacency
matrix `[V, k]`, updated in place after every step), and drafts by expanding a static tree template from the last
token through that matrix: level d takes the first `widths[d]` candidates of each node of level d-1.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import DraftTree, Drafter, StepResult, register


@register
@dataclass
class TokenRecycling(Drafter):
    """Knobs: `top_k` candidates kept per token (8), tree template `widths` per level ((4, 2, 2, 1, 1, 1)),
    `max_nodes` (40)."""

    name = "recycling"
    learns_from_steps = True  # from the verify pass's logits
    top_k: int = 8
    widths: tuple[int, ...] = (4, 2, 2, 1, 1, 1)
    max_nodes: int = 40

    def __post_init__(self) -> None:
        self.widths = tuple(self.widths)
        if not self.widths or max(self.widths) > self.top_k or min(self.widths) < 1:
            raise ValueError(f"recycling: widths must be in [1, top_k={self.top_k}], got {self.widths}")
        self.adjacency: torch.Tensor | None = None  # [V, top_k] candidate ids, -1 = never seen

    def bind(self, engine) -> "TokenRecycling":
        super().bind(engine)
        if self.adjacency is None:  # one per engine, shared by its sequences: the matrix is the method's memory
            vocab = engine.model.config.vocab_size
            self.adjacency = torch.full((vocab, self.top_k), -1, dtype=torch.long)
        return self

    def propose(self, context: list[int]) -> DraftTree:
        tree = DraftTree()
        level = [(0, context[-1])]  # (node index, token)
        for width in self.widths:
            if not level or len(tree) >= self.max_nodes:
                break
            candidates = self.adjacency[[tok for _, tok in level], :width].tolist()
            nxt = []
            for (parent, _), row in zip(level, candidates):
                for tok in row:
                    if tok < 0 or len(tree) >= self.max_nodes:
                        break
                    tree.tokens.append(tok)
                    tree.parents.append(parent)
                    nxt.append((len(tree), tok))
            level = nxt
        return tree

    def observe(self, context: list[int], step: StepResult) -> None:
        root = context[len(context) - len(step.accepted) - 2]
        rows = torch.tensor([root, *step.tree.tokens])
        k = min(self.top_k, step.logits.shape[-1])
        top = step.logits.topk(k, dim=-1).indices.cpu()
        self.adjacency[rows, :k] = top  # a token scored twice in one step keeps its latest candidates

    def max_draft_tokens(self) -> int:
        return self.max_nodes
