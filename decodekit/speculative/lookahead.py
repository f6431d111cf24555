"""Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM Inference Using Lookahead Decoding").

One target forward pass does two things. The lookahead branch runs Jacobi iteration on a window of guessed tokens
(`ngram - 1` levels x `window` columns) that ride along in the pass: the target's argmax at each guess is the next
guess, and each column, read top to bottom plus that argmax, is an n-gram the model itself produced, collected in a
pool. The verification branch proposes the pool's n-grams that start with the last committed token, merged into a
tree. The window is laid out as a tree so the engine's ancestor attention is exact: guess (0, w) follows (0, w-1)
(column 0 follows the root), guess (l, w) follows (l-1, w); each column is thus a plausible continuation of the
text at consecutive positions.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .base import DraftTree, Drafter, StepResult, register


@register
@dataclass
class Lookahead(Drafter):
    """Knobs: `window` W (4), `ngram` N (4), `guesses` G (4 candidates verified per step), `pool_size` (8 n-grams
    kept per first token), `seed` (0, for the initial window)."""

    name = "lookahead"
    learns_from_steps = True  # from the verify pass's logits
    window: int = 4
    ngram: int = 4
    guesses: int = 4
    pool_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.window < 1 or self.ngram < 2 or self.guesses < 0:
            raise ValueError("lookahead: need window >= 1, ngram >= 2, guesses >= 0")
        self.pool: dict[int, list[tuple[int, ...]]] = {}
        self.levels: list[list[int]] = []

    # ---- the n-gram pool ------------------------------------------------------------------------------------
    def add_ngram(self, gram: tuple[int, ...]) -> None:
        entries = self.pool.setdefault(gram[0], [])
        if gram[1:] in entries:
            entries.remove(gram[1:])
        entries.insert(0, gram[1:])  # most recent first
        del entries[self.pool_size:]

    def reset(self, prompt_ids: list[int]) -> None:
        for i in range(len(prompt_ids) - self.ngram + 1):  # the prompt's own n-grams are free candidates
            self.add_ngram(tuple(prompt_ids[i:i + self.ngram]))
        rng = random.Random(self.seed)
        self.levels = [[rng.choice(prompt_ids) for _ in range(self.window)] for _ in range(self.ngram - 1)]

    # ---- one step -------------------------------------------------------------------------------------------
    def propose(self, context: list[int]) -> DraftTree:
        tree = DraftTree(verify=[])
        children: dict[tuple[int, int], int] = {}  # (parent node, token) -> node: candidates merged as a trie
        for gram in self.pool.get(context[-1], [])[: self.guesses]:
            node = 0
            for tok in gram:
                if (node, tok) not in children:
                    tree.tokens.append(tok)
                    tree.parents.append(node)
                    tree.verify.append(True)
                    children[(node, tok)] = len(tree)
                node = children[(node, tok)]
        index: dict[tuple[int, int], int] = {}
        for level, row in enumerate(self.levels):
            for col, tok in enumerate(row):
                if level == 0:
                    parent = index[(0, col - 1)] if col else 0
                else:
                    parent = index[(level - 1, col)]
                tree.tokens.append(tok)
                tree.parents.append(parent)
                tree.verify.append(False)
                index[(level, col)] = len(tree)
        return tree

    def observe(self, context: list[int], step: StepResult) -> None:
        tree = step.tree
        rows = [i for i in range(1, len(tree) + 1) if tree.verify is not None and not tree.verify[i - 1]]
        if len(rows) != len(self.levels) * self.window:
            return  # the window was cut from this step (plain step): nothing to learn
        guesses = step.logits[rows].argmax(-1).view(len(self.levels), self.window).tolist()
        last = len(self.levels) - 1
        for col in range(self.window):  # each column + the prediction after it is an n-gram the model made
            self.add_ngram(tuple(self.levels[level][col] for level in range(len(self.levels))) + (guesses[last][col],))
        # Jacobi step: every level moves up, the newest predictions become the last level
        self.levels = self.levels[1:] + [guesses[last]] if len(self.levels) > 1 else [guesses[0]]

    def max_draft_tokens(self) -> int:
        return (self.window + self.guesses) * (self.ngram - 1)
