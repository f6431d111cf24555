"""SuffixDecoding (Oliaro et al. 2024, "SuffixDecoding: A Model-Free Approach to Speeding Up Large Language Model
Inference").

Two suffix tries (depth-bounded): one over the current request (prompt and output so far, extended incrementally
as tokens are committed) and one over earlier outputs of this drafter (kept across generations). The context's
longest suffix that occurred before, followed by something, is the match; from it a draft tree grows best-first
by empirical continuation frequency, with at most `max_spec_factor` x match-length tokens (longer matches earn
longer drafts), capped by `max_spec_tokens`, and paths below `min_token_prob` pruned.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import DraftTree, Drafter, register
from .tree_search import best_first_tree


class TrieNode:
    __slots__ = ("children", "count")

    def __init__(self) -> None:
        self.children: dict[int, TrieNode] = {}
        self.count = 0


class SuffixTrie:
    """All substrings of length <= max_depth of the appended token stream, with occurrence counts."""

    def __init__(self, max_depth: int) -> None:
        self.root, self.max_depth = TrieNode(), max_depth
        self.active: list[TrieNode] = []  # nodes of the suffixes ending at the last token, shortest first

    def append(self, token: int) -> None:
        nxt = []
        for node in [self.root, *self.active[: self.max_depth - 1]]:
            child = node.children.get(token)
            if child is None:
                child = node.children[token] = TrieNode()
            child.count += 1
            nxt.append(child)
        self.active = nxt

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            self.append(t)

    def end_sequence(self) -> None:
        """Forget the active suffixes so the next sequence does not continue this one."""
        self.active = []

    def match(self, suffix: list[int]) -> tuple[TrieNode | None, int]:
        """The deepest node matching a suffix of `suffix` that has continuations, and the match length."""
        for n in range(min(len(suffix), self.max_depth - 1), 0, -1):
            node = self.root
            for t in suffix[len(suffix) - n:]:
                node = node.children.get(t)
                if node is None:
                    break
            if node is not None and node.children:
                return node, n
        return None, 0


def _continuations(node: TrieNode, branch: int):
    total = sum(c.count for c in node.children.values())
    top = sorted(node.children.items(), key=lambda kv: -kv[1].count)[:branch]
    return [(tok, child.count / total, child) for tok, child in top]


@register
@dataclass
class SuffixDecoding(Drafter):
    """Knobs: trie depth `max_depth` (24), `max_spec_tokens` (32), `max_spec_factor` (2.0: draft size per matched
    token), `min_token_prob` (0.1: prune paths less likely than this), `branch` (3 children per node at most)."""

    name = "suffix"
    max_depth: int = 24
    max_spec_tokens: int = 32
    max_spec_factor: float = 2.0
    min_token_prob: float = 0.1
    branch: int = 3

    def __post_init__(self) -> None:
        if self.max_depth < 2 or self.max_spec_tokens < 1:
            raise ValueError("suffix: need max_depth >= 2 and max_spec_tokens >= 1")
        self.global_trie = SuffixTrie(self.max_depth)  # earlier outputs, across generations
        self.request = SuffixTrie(self.max_depth)  # this prompt and its output so far
        self.output: list[int] = []
        self.context_len = 0

    def reset(self, prompt_ids: list[int]) -> None:
        self.request = SuffixTrie(self.max_depth)
        self.request.extend(prompt_ids)
        self.output, self.context_len = [], len(prompt_ids)

    def finish(self, tokens: list[int]) -> None:
        """The sequence's output joins the corpus of earlier outputs (shared by the engine's sequences)."""
        self._sync(tokens)
        self.global_trie.extend(self.output)
        self.global_trie.end_sequence()

    def _sync(self, context: list[int]) -> None:
        """Feed the tokens committed since the last call (a few per step) to the request trie."""
        new = context[self.context_len:]
        self.request.extend(new)
        self.output += new
        self.context_len = len(context)

    def propose(self, context: list[int]) -> DraftTree:
        self._sync(context)
        recent = context[-self.max_depth:]
        best = DraftTree()
        for trie in (self.request, self.global_trie):
            node, length = trie.match(recent)
            if node is None:
                continue
            budget = min(self.max_spec_tokens, max(1, int(self.max_spec_factor * length)))
            tree = best_first_tree(node, lambda n: _continuations(n, self.branch), budget, budget,
                                   self.min_token_prob)
            if len(tree) > len(best):
                best = tree
        return best

    def max_draft_tokens(self) -> int:
        return self.max_spec_tokens
