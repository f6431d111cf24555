"""`LogitsProcessor`: a SamplingConfig applied to logits, giving distributions and tokens."""
from __future__ import annotations

import torch

from . import warpers
from .config import SamplingConfig
from .penalties import apply_penalties


class LogitsProcessor:
    def __init__(self, config: SamplingConfig) -> None:
        self.config = config.validate()
        c = config
        rules = [(warpers.top_k, c.top_k, c.top_k > 0), (warpers.top_p, c.top_p, c.top_p < 1.0),
                 (warpers.min_p, c.min_p, c.min_p > 0.0), (warpers.typical, c.typical_p, c.typical_p < 1.0),
                 (warpers.epsilon, c.epsilon_cutoff, c.epsilon_cutoff > 0.0),
                 (warpers.eta, c.eta_cutoff, c.eta_cutoff > 0.0), (warpers.top_h, c.top_h, c.top_h > 0.0)]
        self.active = [(fn, value) for fn, value, on in rules if on]  # skip work for rules that are off

    def process(self, logits: torch.Tensor, seen_mask: torch.Tensor | None = None,
                output_counts: torch.Tensor | None = None) -> torch.Tensor:
        """Penalties, then (unless greedy) temperature and the active warpers, in a fixed order."""
        logits = apply_penalties(logits.float(), self.config, seen_mask, output_counts)
        if self.config.greedy:
            return logits
        # Shifted by the row's max (softmax and every warper are shift-invariant), finite first, and the temperature
        # at least the dtype's smallest normal number (below it the distribution is the argmax's anyway): a tiny
        # temperature or an extreme penalty then drives the other logits to -inf, never to NaN.
        info = torch.finfo(logits.dtype)
        logits = logits.nan_to_num(posinf=info.max)
        logits = (logits - logits.amax(-1, keepdim=True)) / max(self.config.temperature, info.tiny)
        for fn, value in self.active:
            logits = fn(logits, value)
        return logits

    def probs(self, logits: torch.Tensor, seen_mask: torch.Tensor | None = None,
              output_counts: torch.Tensor | None = None) -> torch.Tensor:
        """The next-token distribution `[N, V]`; greedy is the point mass on the penalized argmax."""
        logits = self.process(logits, seen_mask, output_counts)
        if self.config.greedy:
            return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
        return logits.softmax(-1)

    def sample(self, probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.config.greedy:
            return probs.argmax(-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]
