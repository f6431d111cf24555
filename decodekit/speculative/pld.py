"""Prompt lookup decoding (Saxena 2023, "Prompt Lookup Decoding"; Spec-Bench's PLD).

Match the last n tokens of the context (n from `max_ngram` down to `min_ngram`) against earlier context, most
recent match first, and propose the tokens that followed the match. Free to draft; pays off when the output
copies from the input (summarization, RAG, code editing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

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


def continuation_on_device(history: torch.Tensor, length: torch.Tensor, min_ngram: int, max_ngram: int,
                           depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`find_continuation` for every row at once, in tensor ops (no host synchronization: it runs inside a captured
    graph). `history` `[R, T]`, row r's context at `[:length[r]]`. Returns `(draft [R, depth], n_draft [R])`."""
    rows, t = history.shape
    dev = history.device
    found = torch.zeros(rows, dtype=torch.bool, device=dev)
    follow = torch.zeros(rows, dtype=torch.long, device=dev)  # where the continuation starts
    for n in range(min(max_ngram, t - 1), min_ngram - 1, -1):  # the longest suffix with an earlier match wins
        suffix = history.gather(1, (length[:, None] - n + torch.arange(n, device=dev)).clamp_min(0))  # [R, n]
        match = (history.unfold(1, n, 1) == suffix[:, None, :]).all(dim=-1)  # [R, T - n + 1]: window at each start
        starts = torch.arange(match.shape[1], device=dev)
        match &= starts[None] <= (length - n - 1)[:, None]  # earlier than the suffix, with a token after it
        last = torch.where(match, starts[None], -1).amax(dim=1)  # most recent match
        hit = ~found & (last >= 0)
        follow = torch.where(hit, last + n, follow)
        found |= hit
    draft = history.gather(1, (follow[:, None] + torch.arange(depth, device=dev)).clamp_max(t - 1))
    return draft, torch.where(found, (length - follow).clamp(0, depth), 0)


@register
@dataclass
class PromptLookup(Drafter):
    """Knobs: `num_draft` tokens proposed per step (10), n-gram sizes tried from `max_ngram` (3) to `min_ngram` (1);
    `on_device`: greedy sequences on a GPU draft, verify and commit on the device in fused rounds
    (`speculative/device.py`), several rounds per host synchronization."""

    name = "pld"
    num_draft: int = 10
    max_ngram: int = 3
    min_ngram: int = 1
    on_device: bool = True

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

    @property
    def drafts_on_device(self) -> bool:
        return self.on_device

    def propose_on_device(self, history: torch.Tensor, length: torch.Tensor, depth: int,
                          rounds=None) -> tuple[torch.Tensor, torch.Tensor]:
        draft, n = continuation_on_device(history, length, self.min_ngram, self.max_ngram, depth)
        return draft, n.clamp_max(self.num_draft)
