"""Self-speculative decoding by layer skipping: the target drafts for itself with some layers left out (Draft &
Verify, Zhang et al. 2023), the skipped set chosen on the fly from measured acceptance (SWIFT, Xia et al. 2024),
skipping fewer layers when acceptance collapses (the dynamic depth of DEL, Zarch et al. 2025).

No second model: the draft runs the target's own weights over its own KV cache. Every `adapt_every` steps the
drafter tries a neighbouring skip set (one skipped layer swapped for a kept one) and keeps whichever drafted with
the higher acceptance rate; when acceptance falls under `min_accept` one layer is put back.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .base import StepResult, register
from .draft_model import DraftModel


@register
@dataclass
class LayerSkip(DraftModel):
    """Knobs: `skip_ratio` (fraction of layers skipped at first, 0.3), `num_draft` (4), `stop_threshold` (0.3),
    `adapt` (True), `adapt_every` (16 steps), `min_accept` (0.2), `seed` (0)."""

    name = "layerskip"
    model: object = None
    num_draft: int = 4
    stop_threshold: float = 0.3
    skip_ratio: float = 0.3
    adapt: bool = True
    adapt_every: int = 16
    min_accept: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.skip_ratio < 1.0:
            raise ValueError(f"layerskip: skip_ratio must be in [0, 1), got {self.skip_ratio}")
        self.rng = random.Random(self.seed)
        self.trial: frozenset[int] | None = None
        self.scores: dict[frozenset[int], float] = {}
        self.drafted = self.accepted = self.steps = 0

    def _draft_model(self):
        return self.engine.model  # the target itself

    def bind(self, engine) -> "LayerSkip":
        super().bind(engine)
        if not self.skip_layers:
            n = engine.model.config.num_layers
            middle = list(range(1, n - 1))  # never the first or the last layer
            # Skip from the middle outward: late-middle layers are the most redundant (SWIFT, Fig. 2).
            middle.sort(key=lambda i: abs(i - 0.6 * (n - 1)))
            self.skip_layers = frozenset(middle[: int(self.skip_ratio * n)])
        return self

    def observe(self, context: list[int], step: StepResult) -> None:
        drafted = sum(1 for _ in step.tree.tokens)
        if not drafted or not self.adapt:
            return
        self.drafted += drafted
        self.accepted += len(step.accepted)
        self.steps += 1
        if self.steps < self.adapt_every:
            return
        rate = self.accepted / self.drafted
        self.scores[self.skip_layers] = rate
        self.drafted = self.accepted = self.steps = 0
        if self.trial is not None:  # a trial just ended: keep the better of the trial and the incumbent
            best = max(self.scores, key=self.scores.get)
            self.skip_layers, self.trial = best, None
        elif rate < self.min_accept and self.skip_layers:
            self.skip_layers = frozenset(sorted(self.skip_layers)[1:])  # put one layer back
        else:
            self.skip_layers = self.trial = self._neighbour()
        self.cache.reset()  # another layer set: the cached keys of newly run layers are missing
        self.cached = []

    def _neighbour(self) -> frozenset[int]:
        n = self.engine.model.config.num_layers
        skipped, kept = sorted(self.skip_layers), [i for i in range(1, n - 1) if i not in self.skip_layers]
        if not skipped or not kept:
            return self.skip_layers
        out, back = self.rng.choice(skipped), self.rng.choice(kept)
        return frozenset((set(skipped) - {out}) | {back})



