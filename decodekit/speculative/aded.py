"""ADED (Liu et al. 2024, "Adaptive Draft-Verification for Efficient Large Language Model Decoding").

A tri-gram model of the text at hand, built from the prompt and updated with every committed token, so it adapts
to the model's own outputs as decoding goes. Drafts grow best-first by tri-gram probability (bi-gram where the
tri-gram context is unseen) into a tree of `max_nodes` nodes and depth `max_depth`.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from .base import DraftTree, Drafter, register
from .tree_search import best_first_tree


@register
@dataclass
class ADED(Drafter):
    """Knobs: `max_nodes` (24), `max_depth` (8), `branch` (3 candidates per node), `min_prob` (0.05 path probability)."""

    name = "aded"
    max_nodes: int = 24
    max_depth: int = 8
    branch: int = 3
    min_prob: float = 0.05

    def __post_init__(self) -> None:
        if self.max_nodes < 1 or self.max_depth < 1 or self.branch < 1:
            raise ValueError("aded: max_nodes, max_depth and branch must be >= 1")
        self.trigram: dict[tuple[int, int], Counter] = defaultdict(Counter)
        self.bigram: dict[int, Counter] = defaultdict(Counter)
        self.seen = 0

    def reset(self, prompt_ids: list[int]) -> None:
        # The tables persist across generations (the adaptive part); the prompt is added to them.
        self.seen = 0
        self._update(prompt_ids)

    def _update(self, context: list[int]) -> None:
        for i in range(max(self.seen, 1), len(context)):
            self.bigram[context[i - 1]][context[i]] += 1
            if i >= 2:
                self.trigram[(context[i - 2], context[i - 1])][context[i]] += 1
        self.seen = len(context)

    def _expand(self, state: tuple[int, int]):
        counts = self.trigram.get(state) or self.bigram.get(state[1])
        if not counts:
            return []
        total = sum(counts.values())
        return [(tok, c / total, (state[1], tok)) for tok, c in counts.most_common(self.branch)]

    def propose(self, context: list[int]) -> DraftTree:
        self._update(context)
        if len(context) < 2:
            return DraftTree()
        return best_first_tree((context[-2], context[-1]), self._expand, self.max_nodes, self.max_depth,
                               self.min_prob)

    def max_draft_tokens(self) -> int:
        return self.max_nodes
