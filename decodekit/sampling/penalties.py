"""Repetition penalties: CTRL's multiplicative one over prompt and output, OpenAI's additive ones over output."""
from __future__ import annotations

import torch

from .config import SamplingConfig


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each vocabulary entry occurs in `token_ids` `[M]`, as float `[V]`."""
    return torch.bincount(token_ids.long(), minlength=vocab_size)[:vocab_size].float()


def apply_penalties(logits: torch.Tensor, cfg: SamplingConfig, seen_mask: torch.Tensor | None = None,
                    output_counts: torch.Tensor | None = None) -> torch.Tensor:
    """`seen_mask` `[N, V]`: tokens in prompt or output (repetition penalty, Keskar et al. 2019: positive logits
    are divided by the penalty, negative ones multiplied). `output_counts` `[N, V]`: occurrences in the output
    (presence: minus `presence` once a token occurred; frequency: minus `frequency` per occurrence)."""
    if cfg.repetition_penalty != 1.0 and seen_mask is not None:
        r = cfg.repetition_penalty
        penalized = torch.where(logits > 0, logits / r, logits * r)
        logits = torch.where(seen_mask, penalized, logits)
    if output_counts is not None and (cfg.presence_penalty or cfg.frequency_penalty):
        logits = logits - cfg.presence_penalty * (output_counts > 0).float() - cfg.frequency_penalty * output_counts
    return logits
