"""Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; Spec-Bench's PLD).

Match the last n tokens of the context (n from `max_ngram` down to `min_ngram`) against earlier context, most
recent match first, and propose the tokens that followed the match. Free to draft; pays off when the output
copies from the input (summarization, RAG, code editing).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import DraftTree, Drafter, register


def find_continuation(context: list[int], min_ngram: int, max_ngram: int, length: int) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the context's longest matching suffix."""
    n_ctx = len(context)
    for n in range(min(max_ngram, n_ctx - 1), min_ngram - 1, -1):
        suffix = context[n_ctx - n:]
        for start in range(n_ctx - n - 1, -1, -1):  # most recent first
            if context[start:start + n] == suffix:
                follow = context[start + n:start + n + length]
                if follow:
                    return follow
    return []


@register
@dataclass
class PromptLookup(Drafter):
    """Knobs: `num_draft` tokens proposed per step (10), n-gram sizes tried from `max_ngram` (3) to `min_ngram` (1)."""

    name = "pld"
    num_draft: int = 10
    max_ngram: int = 3
    min_ngram: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {self.min_ngram}, {self.max_ngram}")
        if self.num_draft < 1:
            raise ValueError(f"num_draft must be >= 1, got {self.num_draft}")

    def propose(self, context: list[int]) -> DraftTree:
        return DraftTree.chain(find_continuation(context, self.min_ngram, self.max_ngram, self.num_draft))

    def max_draft_tokens(self) -> int:
        return self.num_draft
