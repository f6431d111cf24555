"""Entropy adaptive decoding (Simonds 2025, "Entropy Adaptive Decoding: Dynamic Model Switching for Efficient
Inference").

A cheap model decodes while it is sure; where it is not, the target takes over until the text is predictable again.
Sureness is the rolling mean of the entropy (bits, of the raw logits) of the distributions the last `window` tokens
were drawn from, whichever model drew them: the cheap model hands over when the mean exceeds `threshold` (the token
at that position is then the target's), the target hands back once it has drawn at least `window` tokens and the
mean is at most `threshold`. Unlike speculative decoding the output is not the target's: the cheap model's tokens
stand (controlled divergence, for a fraction of the target's decode steps).

The cheap model is any model with the target's tokenizer (`model`: a source for `decodekit.load`, an Engine or a
Transformer), or by default the target itself with layers skipped (`skip_ratio` of them, middle-to-late first, or
`skip_layers`), each with a KV cache of its own (the draft-model and layer-skip drafters' caches). On the engine
the cheap model's tokens, up to `chunk` at a time, ride in the target's pass as a chain: the target writes their
keys and values (needed when it takes over) and gives its distribution after them, from which its first token
comes when the cheap model hands over. Sampling rules apply to both models' draws (penalties see committed tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..speculative.base import DraftTree
from ..speculative.draft_model import DraftModel
from ..speculative.layerskip import LayerSkip
from .base import PolicySearch, SinglePolicy, check, commit_token, draw, entropy, register


def bits(logits: torch.Tensor) -> float:
    return float(entropy(logits)) / math.log(2)


@register
@dataclass
class EntropySwitch(PolicySearch):
    """Knobs (defaults): `threshold` (1.5 bits), `window` (5 tokens), `model` (None: the target with layers
    skipped), `skip_ratio` (0.5), `skip_layers` (None: chosen by skip_ratio), `chunk` (8: cheap tokens per pass)."""

    name = "entropy_switch"
    threshold: float = 1.5
    window: int = 5
    model: Any = None
    skip_ratio: float = 0.5
    skip_layers: Any = None
    chunk: int = 8

    def __post_init__(self) -> None:
        check(isinstance(self.window, int) and self.window >= 1, f"{self.name}: window must be an integer >= 1")
        check(isinstance(self.chunk, int) and self.chunk >= 1, f"{self.name}: chunk must be an integer >= 1")
        check(0.0 <= self.skip_ratio < 1.0, f"{self.name}: skip_ratio must be in [0, 1)")

    def cheap_model(self, engine):
        """The cheap model's drafter prototype (its KV pool), made once per engine and options."""
        key = (repr(self.model) if not isinstance(self.model, str) else self.model, self.skip_ratio,
               tuple(sorted(self.skip_layers or ())), self.chunk)
        made = engine.__dict__.setdefault("entropy_switch_models", {})
        if key not in made:
            if self.model is not None:
                proto = DraftModel(model=self.model, num_draft=self.chunk)
            else:
                proto = LayerSkip(skip_ratio=self.skip_ratio, skip_layers=frozenset(self.skip_layers or ()),
                                  num_draft=self.chunk, adapt=False, share_cache=False)
            made[key] = proto.bind(engine)
        return made[key]

    def policy(self, engine, req) -> "SwitchPolicy":
        return SwitchPolicy(self, self.cheap_model(engine))


class SwitchPolicy(SinglePolicy):
    def __init__(self, search: EntropySwitch, proto) -> None:
        self.search, self.proto = search, proto
        self.max_nodes = search.chunk
        self.cheap = None  # the cheap model's state for this request's sequence (its own KV cache)
        self.window: list[float] = []  # entropies (bits) of the last tokens' distributions
        self.on_target = False
        self.held = 0  # tokens the target drew since it took over
        self.pending: tuple[list[int], list[float], bool] | None = None  # the planned chain
        self.cheap_tokens = self.target_tokens = 0

    def _mean(self, window: list[float]) -> float:
        last = window[-self.search.window:]
        return sum(last) / len(last)

    def _chain(self, seq, limit: int) -> tuple[list[int], list[float], bool]:
        """Up to `limit` cheap tokens after `seq`'s tokens, the window after them, and whether it hands over."""
        if self.cheap is None:
            self.cheap = self.proto.spawn(seq.kv, seq.sampling, seq.prompt)
        cheap, root = self.cheap, len(seq.tokens) - 1
        window, tokens = list(self.window), []
        try:
            logits = cheap._sync(seq.tokens)
            for i in range(limit):
                window.append(bits(logits))
                if self._mean(window) > self.search.threshold:
                    return tokens, window, True
                tokens.append(draw(seq, seq.next_logits(logits[None])))
                if i + 1 < limit:
                    logits = cheap._feed(tokens[-1:], [root + i + 1])[-1]
                    cheap.cached.append(tokens[-1])
            return tokens, window, False
        finally:
            cheap._release(root)

    def plan(self, seq) -> DraftTree:
        if self.on_target or not seq.output:
            return DraftTree()
        self.pending = self._chain(seq, min(self.search.chunk, seq.room))
        return DraftTree.chain(self.pending[0])

    def step(self, core, req, rows) -> list:
        (seq, (logits, _)), = rows.items()
        if not seq.output and not self.on_target:  # the prompt's logits: the first token, the cheap model's if sure
            tokens, window, switch = self._chain(seq, 1)
            self.pending = ([], window, switch) if switch else (tokens, window, False)
            if not switch:
                self.window = window
                self.cheap_tokens += 1
                commit_token(seq, logits[-1:], tokens[0])
                return self._end(seq)
            return self._take_over(seq, logits[-1:], 0)
        if self.on_target:
            row = logits[:1]
            self.window.append(bits(row))
            self.held += 1
            self.target_tokens += 1
            commit_token(seq, row, draw(seq, seq.next_logits(row)))
            if self.held >= self.search.window and self._mean(self.window) <= self.search.threshold:
                self.on_target = False
            return self._end(seq)
        tokens, window, switch = self.pending
        n = len(tokens)
        width = 1 + n
        if switch:
            seq.kv.keep_path(seq.kv.length - width, list(range(n + 1)))  # every cheap token's entry stays
            seq.record_logprobs(logits[:n], seq.commit(tokens))
            self.cheap_tokens += n
            if seq.finished:
                return self._end(seq)
            return self._take_over(seq, logits[n:n + 1], 0)
        seq.kv.keep_path(seq.kv.length - width, list(range(n)))  # the last cheap token is the next root
        seq.record_logprobs(logits[:n], seq.commit(tokens))
        self.cheap_tokens += n
        self.window = window[-self.search.window:]
        return self._end(seq)

    def _take_over(self, seq, row: torch.Tensor, width: int) -> list:
        """The target draws the token at the position where the cheap model was unsure (its entries are kept)."""
        _, window, _ = self.pending
        window[-1] = bits(row)
        self.window = window[-self.search.window:]
        self.on_target, self.held = True, 1
        self.target_tokens += 1
        seq.record_logprobs(row, seq.commit([draw(seq, seq.next_logits(row))]))
        return self._end(seq)

    def _end(self, seq) -> list:
        if seq.finished and self.cheap is not None:
            self.cheap.finish(seq.tokens)  # its KV cache returns
        return [seq]
