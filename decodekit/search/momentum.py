"""Momentum decoding (Lan et al. 2022, "Momentum Decoding: Open-ended Text Generation As Graph Exploration").

Generation is a walk over a graph whose nodes are the tokens seen so far (prompt and output) and whose edges join
consecutive tokens; degeneration is the walk going round a circuit. At each step the `beam_width` most probable
tokens are candidates and the most probable one wins unless re-entering the graph is penalized:
    score(v) = p(v | context) - alpha x resistance(l(v))
where l(v) is the length of the longest n-gram (n <= `max_ngram`) ending with v whose other tokens are the context's
last ones and which already occurred in the context (0 if v is a new node, 1 if it occurred but no longer n-gram
repeats). The resistance functions are those of the authors' code: "linear" (l itself; their table for GPT-2 XL,
the default), "ngram_block" (0 below 4, 5 at 4, infinite beyond: their code's default), "constant" (2 for any
l >= 1), "log" (log_6(1 + l) / 0.2) and "exp" (1.5^l / 2). p is the distribution the sampling rules define; the
choice is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .base import PolicySearch, TokenPolicy, check, register

RESISTANCE = {
    "linear": lambda n: float(n),
    "ngram_block": lambda n: 0.0 if n < 4 else 5.0 if n == 4 else math.inf,
    "constant": lambda n: 0.0 if n == 0 else 2.0,
    "log": lambda n: 0.0 if n == 0 else math.log(1 + n, 6) / 0.2,
    "exp": lambda n: 0.0 if n == 0 else 1.5 ** n / 2,
}


def repetition_length(context: list[int], token: int, max_ngram: int) -> int:
    """The longest n <= max_ngram such that context[-(n-1):] + [token] occurs in `context`; 1 if only `token` does,
    0 if it does not occur."""
    if token not in context:
        return 0
    for n in range(min(max_ngram, len(context) + 1), 1, -1):
        gram = context[len(context) - n + 1:] + [token]
        if any(context[i:i + n] == gram for i in range(len(context) - n + 1)):
            return n
    return 1


@register
@dataclass
class Momentum(PolicySearch):
    """Knobs (defaults): `alpha` (0.2), `beam_width` (5: candidates), `max_ngram` (5), `resistance` ("linear" |
    "ngram_block" | "constant" | "log" | "exp")."""

    name = "momentum"
    alpha: float = 0.2
    beam_width: int = 5
    max_ngram: int = 5
    resistance: str = "linear"

    def __post_init__(self) -> None:
        check(self.alpha >= 0, f"{self.name}: alpha must be >= 0")
        check(isinstance(self.beam_width, int) and self.beam_width >= 1, f"{self.name}: beam_width must be >= 1")
        check(isinstance(self.max_ngram, int) and self.max_ngram >= 1, f"{self.name}: max_ngram must be >= 1")
        check(self.resistance in RESISTANCE,
              f"{self.name}: resistance must be one of {', '.join(RESISTANCE)}, got {self.resistance!r}")

    def policy(self, engine, req) -> "MomentumPolicy":
        return MomentumPolicy(self)


class MomentumPolicy(TokenPolicy):
    def __init__(self, search: Momentum) -> None:
        self.search = search
        self.resistance = RESISTANCE[search.resistance]

    def choose(self, seq, logits, hidden) -> int:
        s = self.search
        probs = seq.next_logits(logits).softmax(-1)[0]
        top = probs.topk(min(s.beam_width, int((probs > 0).sum())))
        scores = [p - s.alpha * self.resistance(repetition_length(seq.tokens, t, s.max_ngram))
                  for p, t in zip(top.values.tolist(), top.indices.tolist())]
        return top.indices.tolist()[max(range(len(scores)), key=lambda i: (scores[i], -i))]
