"""Self-speculative decoding by layer skipping: the target drafts for itself with some of its layers left out.

- Draft & Verify (Zhang et al. 2023, "Draft & Verify: Lossless Large Language Model Acceleration via
  Self-Speculative Decoding"): skip intermediate layers to draft, verify with the full model; stop drafting when
  the draft's top-1 probability falls under a threshold.
- SWIFT (Xia et al. 2024, "SWIFT: On-the-Fly Self-Speculative Decoding for LLM Inference Acceleration"): choose
  the skipped set on the fly, from the acceptance it measures, with no training and no offline search.
- DEL (Zarch et al. 2025, "DEL: Context-Aware Dynamic Exit Layer for Efficient Self-Speculative Decoding"):
  adapt how much of the model the draft runs to the acceptance it gets.

No second model and, by default, no second cache: like Draft & Verify and LayerSkip (Elhoushi et al. 2024), the
draft attends over the target's exact keys and values of the committed text (`share_cache=True`); draft tokens
are written past them, for the layers the draft runs, and rolled back before the target's verify pass. Nothing
is prefilled or synchronized, and changing the skipped set costs nothing. With `share_cache=False` the draft
keeps its own cache (a pool of its own), synchronized like the draft-model drafter's, and re-prefills when the
skipped set changes.

Adaptation (`adapt=True`): acceptance (accepted tokens per drafted token) is measured over windows of
`adapt_every` steps. After a window, if acceptance collapsed (< `min_accept`) a quarter of the skipped layers (at
least one) run again; if it is near perfect (> `max_accept`) one more layer is skipped unless that set already
failed; otherwise a neighbouring set (one skipped layer swapped for a kept one) is tried for a window and kept if
it accepts more.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from .base import DraftTree, StepResult, register
from .draft_model import ModelDrafter, native_model


@register
@dataclass
class LayerSkip(ModelDrafter):
    """Knobs (defaults): `skip_ratio` (0.3: fraction of layers skipped at first, middle-to-late layers first; the
    first and last layer always run), `skip_layers` (empty: an explicit initial skipped set, overrides
    `skip_ratio`), `num_draft` (4: max chain length), `stop_threshold` (0.3: stop drafting when the draft's
    top-1 probability falls under it), `adapt` (True: SWIFT-style skip-set search), `adapt_every` (16 steps per
    measurement window), `min_accept` (0.2: skip a quarter fewer below it), `max_accept` (0.9: skip one more above
    it), `share_cache` (True: draft over the target's KV cache), `seed` (0: of the skip-set search)."""

    name = "layerskip"
    skip_ratio: float = 0.3
    skip_layers: frozenset[int] = field(default_factory=frozenset)
    num_draft: int = 4
    stop_threshold: float = 0.3
    adapt: bool = True
    adapt_every: int = 16
    min_accept: float = 0.2
    max_accept: float = 0.9
    share_cache: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.skip_ratio < 1.0:
            raise ValueError(f"layerskip: skip_ratio must be in [0, 1), got {self.skip_ratio}")
        if self.num_draft < 1 or self.adapt_every < 1:
            raise ValueError("layerskip: num_draft and adapt_every must be >= 1")
        if not 0.0 <= self.stop_threshold < 1.0:
            raise ValueError(f"layerskip: stop_threshold must be in [0, 1), got {self.stop_threshold}")
        self.skip_layers = frozenset(self.skip_layers)
        self.rng = random.Random(self.seed)
        self.net = None
        self.cache = None
        self.draw = None  # drafts are greedy: deterministic, lossless under every verifier
        self.pool_holder: list = []
        self.order: list[int] = []  # skippable layers, most redundant first
        self.scores: dict[frozenset[int], float] = {}  # acceptance rate measured per skipped set (moving average)
        self.trial: frozenset[int] | None = None  # a neighbouring set on trial ...
        self.incumbent: frozenset[int] | None = None  # ... against this one
        self.drafted = self.accepted = self.steps = 0

    @property
    def skip(self) -> frozenset[int]:
        return self.skip_layers

    def bind(self, engine) -> "LayerSkip":
        super().bind(engine)
        self.net = native_model(engine.model)
        n = self.net.config.num_layers
        # Middle-to-late layers first: they change the residual stream least (Draft & Verify Fig. 3; SWIFT Fig. 2).
        self.order = sorted(range(1, n - 1), key=lambda i: (abs(i - 0.6 * (n - 1)), i))
        if self.skip_layers & {0, n - 1} or any(not 0 <= i < n for i in self.skip_layers):
            raise ValueError(f"layerskip: skip_layers must lie in 1..{n - 2} (the first and last layer always run)")
        if not self.skip_layers and not self.scores:
            self.skip_layers = frozenset(self.order[:min(round(self.skip_ratio * n), len(self.order))])
        return self

    def reset(self, prompt_ids: list[int]) -> None:
        self._open_cache(shared=self.share_cache)

    def _predicted(self, path_prob: float, top1: float) -> float:
        return top1  # Draft & Verify's confidence rule: the next token's own top-1 probability

    def propose(self, context: list[int]) -> DraftTree:
        if not self.skip_layers and not self.adapt:
            return DraftTree()  # the full model would draft exactly what it verifies: a plain step is cheaper
        return super().propose(context)

    # ---- skip-set search -----------------------------------------------------------------------------------
    def _switch(self, skipped: frozenset[int]) -> None:
        if skipped == self.skip_layers:
            return
        self.skip_layers = skipped
        if not self.shared and self.cache is not None:  # own cache: the newly run layers lack the context's keys
            self.cache.rollback(0)
            self.cached, self.committed = [], 0

    def observe(self, context: list[int], step: StepResult) -> None:
        if not self.adapt or not len(step.tree):
            return
        self.drafted += len(step.tree)
        self.accepted += len(step.accepted)
        self.steps += 1
        if self.steps < self.adapt_every:
            return
        rate = self.accepted / self.drafted
        self.drafted = self.accepted = self.steps = 0
        current = self.skip_layers
        old = self.scores.get(current)
        self.scores[current] = rate if old is None else 0.5 * old + 0.5 * rate
        if self.trial is not None:  # a trial window ended: keep the better of trial and incumbent
            incumbent, self.trial = self.incumbent, None
            if self.scores.get(incumbent, -1.0) > self.scores[current]:
                self._switch(incumbent)
            return
        if rate < self.min_accept and current:
            # Acceptance collapsed: run again the least redundant quarter (at least one) of the skipped layers.
            back = sorted(current, key=self.order.index)[-max(1, len(current) // 4):]
            self._switch(current - set(back))
        elif rate > self.max_accept and self._grow() is not None:
            self._switch(self._grow())
        else:
            trial = self._neighbour()
            if trial != current:
                self.trial, self.incumbent = trial, current
                self._switch(trial)

    def _grow(self) -> frozenset[int] | None:
        """One more skipped layer (the most redundant one still run), unless that set was measured to fail."""
        kept = [i for i in self.order if i not in self.skip_layers]
        if not kept:
            return None
        bigger = self.skip_layers | {kept[0]}
        if self.scores.get(bigger, 1.0) < self.min_accept:
            return None
        return bigger

    def _neighbour(self) -> frozenset[int]:
        skipped = sorted(self.skip_layers)
        kept = [i for i in self.order if i not in self.skip_layers]
        if not skipped or not kept:
            return self.skip_layers
        out, back = self.rng.choice(skipped), self.rng.choice(kept)
        return frozenset((set(skipped) - {out}) | {back})
