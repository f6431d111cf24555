"""Best-of-n: n samples drawn as one batch (one prefill, forks sharing the prompt's KV; any speculative `method`
drafts them), the best by a scorer returned.

Scorers (higher is better):
- "self_certainty" (Kang et al. 2025, "Scalable Best-of-N Selection for Large Language Models via
  Self-Certainty"): the mean over the sample's tokens of KL(uniform || p), p the model's distribution each token was
  drawn from, i.e. -log V - mean_v log p(v): how far from uniform, how sure, the model was;
- "logprob": the mean log-probability of the sample's tokens;
- "mbr" (minimum Bayes risk; Bertsch et al. 2023, "It's MBR All the Way Down"; Wu et al. 2025, "Better
  Instruction-Following Through Minimum Bayes Risk"): the mean `utility` (chrF, BLEU, ROUGE, or a callable) of the
  sample's text against the other samples' as pseudo-references.
Token statistics come from the raw logits each token was drawn from (as logprobs do), before the sampling rules.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .base import SampleSearch, check, register, token_logprob
from .utilities import mbr_scores, utility_of

SCORERS = ("self_certainty", "logprob", "mbr")


def self_certainty(logp: torch.Tensor, tokens: list[int]) -> list[float]:
    """Token statistic: KL(uniform || p) of each row of `logp` `[k, V]`."""
    return (-logp.mean(-1) - math.log(logp.shape[-1])).tolist()


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("-inf")


@register
@dataclass
class BestOfN(SampleSearch):
    """Knobs (defaults): `n` (8 samples), `scorer` ("self_certainty" | "logprob" | "mbr"), `utility` ("chrf" |
    "bleu" | "rouge1" | "rouge2" | "rougeL" | a callable (hypothesis, reference) -> float; for mbr), `arithmetic`
    (False: independent samples; True: arithmetic codes)."""

    name = "best_of_n"
    scorer: str = "self_certainty"
    utility: Any = "chrf"

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.scorer in SCORERS, f"{self.name}: scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")
        if self.scorer == "mbr":
            self.utility = utility_of(self.utility)

    def statistic(self):
        return {"self_certainty": self_certainty, "logprob": token_logprob}.get(self.scorer)

    def scores(self, engine, req, results, seqs) -> list[float]:
        if self.scorer == "mbr":
            return mbr_scores([r.text for r in results], self.utility)
        return [mean(s.token_stats) for s in seqs]
