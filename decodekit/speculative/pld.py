"""Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; Spec-Bench's PLD).

Match the last n tokens of the context (n from `max_ngram` down to `min_ngram`) against earlier context, most
recent match first, and propose the tokens that followed the match. Free to draft; pays off when the output
copies from the input (summarization, RAG, code editing).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import DraftTree, Drafter, register


class NgramIndex:
    """For each n, the most recent start of every n-gram that has a token after it, kept up to date as the
    context grows: a lookup is O(max_ngram) per step instead of a scan of the context. Same answers as
    `find_continuation`."""

    def __init__(self, min_ngram: int, max_ngram: int) -> None:
        self.sizes = range(min_ngram, max_ngram + 1)
        self.starts: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in self.sizes}
        self.context: list[int] = []

    def _extend(self, context: list[int]) -> None:
        old = len(self.context)
        if old > len(context) or (old and context[old - 1] != self.context[-1]):  # not an extension: rebuild
            self.starts, old = {n: {} for n in self.sizes}, 0
        for n in self.sizes:  # starts s with s + n <= len - 1, so at least one token follows the n-gram
            table = self.starts[n]
            for s in range(max(0, old - n), len(context) - n):
                table[tuple(context[s:s + n])] = s
        self.context = list(context)

    def continuation(self, context: list[int], length: int) -> list[int]:
        self._extend(context)
        for n in reversed(self.sizes):
            if n >= len(context):
                continue
            start = self.starts[n].get(tuple(context[len(context) - n:]))
            if start is not None:
                return context[start + n:start + n + length]
        return []


def find_continuation(context: list[int], min_ngram: int, max_ngram: int, length: int) -> list[int]:
    """Tokens that followed the most recent earlier occurrence of the context's longest matching suffix (the
    definition, by scanning; `NgramIndex` answers the same incrementally)."""
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
        self.index = NgramIndex(self.min_ngram, self.max_ngram)

    def reset(self, prompt_ids: list[int]) -> None:
        self.index = NgramIndex(self.min_ngram, self.max_ngram)

    def propose(self, context: list[int]) -> DraftTree:
        return DraftTree.chain(self.index.continuation(context, self.num_draft))

    def max_draft_tokens(self) -> int:
        return self.num_draft
