"""AdaDec (He et al. 2025, "Towards Better Code Generation: Adaptive Decoding with Uncertainty Guidance").

Greedy decoding that pauses where the model is unsure: when the entropy of the next-token distribution reaches
`entropy_threshold` (nats; the paper learns one per model, 0.6-1.3 for its models), the `num_candidates` most
probable tokens are each followed by a greedy lookahead of up to `lookahead_length` tokens (`dynamic_length`: a
lookahead also ends with its line, the paper's AdaDynL), and the candidate with the best mean log-probability over
itself and its lookahead, (log p(c) + sum of the lookahead's log p) / (1 + lookahead length), is taken. Low-entropy
steps follow the sampling rule (greedy by default); the scores use the distribution the sampling rules define.

On the engine the sequence pauses at such a step (keeping its KV), its candidates' lookaheads run as forks sharing
that KV, and the chosen candidate is committed to it. When decoding is greedy, the chosen lookahead's tokens up to
its first high-entropy step are committed too: they are exactly what the next steps would pick, so they are not
recomputed (their KV is, in one prefill chunk).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import (PolicySearch, SinglePolicy, check, commit_token, draw, entropy, finish_all, fork, keep_root,
                   register)


@register
@dataclass
class AdaDec(PolicySearch):
    """Knobs (defaults): `entropy_threshold` (1.0 nats), `num_candidates` (3), `lookahead_length` (5),
    `dynamic_length` (False)."""

    name = "adadec"
    entropy_threshold: float = 1.0
    num_candidates: int = 3
    lookahead_length: int = 5
    dynamic_length: bool = False

    def __post_init__(self) -> None:
        check(self.entropy_threshold >= 0, f"{self.name}: entropy_threshold must be >= 0")
        check(isinstance(self.num_candidates, int) and self.num_candidates >= 1,
              f"{self.name}: num_candidates must be an integer >= 1")
        check(isinstance(self.lookahead_length, int) and self.lookahead_length >= 0,
              f"{self.name}: lookahead_length must be an integer >= 0")

    def policy(self, engine, req) -> "AdaDecPolicy":
        return AdaDecPolicy(self)


@dataclass(eq=False)
class Lookahead:
    token: int  # the candidate
    score: float  # log p of the candidate plus the lookahead's tokens
    tokens: list[int] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)  # raw logits each lookahead token was drawn from
    entropies: list[float] = field(default_factory=list)
    done: bool = False


class AdaDecPolicy(SinglePolicy):
    def __init__(self, search: AdaDec) -> None:
        self.search = search
        self.main = None
        self.row: torch.Tensor | None = None  # the paused step's raw logits
        self.looks: dict = {}  # fork -> its Lookahead

    def step(self, core, req, rows) -> list:
        if self.looks:
            return self._advance(req, rows)
        (seq, (logits, _)), = rows.items()
        row = logits[:1]
        processed = seq.next_logits(row)
        if float(entropy(processed)) < self.search.entropy_threshold or seq.room <= 1:
            commit_token(seq, row, draw(seq, processed))
            return [seq]
        return self._pause(core, req, seq, row, processed)

    def _pause(self, core, req, seq, row, processed) -> list:
        """Keep the root, pause, and fork one lookahead per candidate."""
        top = processed.log_softmax(-1)[0].topk(self.search.num_candidates)
        keep_root(seq)
        seq.paused = True
        self.main, self.row = seq, row
        forks = []
        for token, logp in zip(top.indices.tolist(), top.values.tolist()):
            child = fork(core, seq, self.search.name)
            child.commit([token])
            look = Lookahead(token, logp)
            look.done = child.finished or self.search.lookahead_length == 0
            child.paused = look.done
            self.looks[child] = look
            forks.append(child)
        return forks if not all(x.done for x in self.looks.values()) else self._decide(req)

    def _advance(self, req, rows) -> list:
        for child, (logits, _) in rows.items():
            look = self.looks[child]
            row = logits[:1]
            processed = child.next_logits(row)
            logp = processed.log_softmax(-1)[0]
            token = int(logp.argmax())
            look.entropies.append(float(entropy(processed)))
            look.score += float(logp[token])
            look.tokens.append(token)
            look.rows.append(row)
            keep_root(child)
            kept = child.commit([token])
            look.done = (child.finished or len(look.tokens) >= self.search.lookahead_length
                         or (self.search.dynamic_length and "\n" in child.stopper.decoder.tokenizer.decode(kept)))
            child.paused = look.done
        if not all(x.done for x in self.looks.values()):
            return list(rows)
        return self._decide(req)

    def _decide(self, req) -> list:
        best = max(self.looks.values(), key=lambda x: x.score / (1 + len(x.tokens)))
        tokens, rows = [best.token], [self.row]
        if self.main.sampling.greedy:  # what the next steps would pick anyway: up to the first uncertain one
            for token, row, h in zip(best.tokens, best.rows, best.entropies):
                if h >= self.search.entropy_threshold:
                    break
                tokens.append(token)
                rows.append(row)
        for child in self.looks:
            if not child.finished:
                child.paused = False
                child.finish("abort")
        seq = self.main
        seq.paused = False
        seq.record_logprobs(torch.cat(rows), seq.commit(tokens))
        self.looks, self.main, self.row = {}, None, None
        if seq.finished:
            finish_all(req)
        return [seq]
