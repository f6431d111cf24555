"""Quality-aware reranking of n samples (Fernandes et al. 2022, "Quality-Aware Decoding for Neural Machine
Translation"): the samples are ranked by a weighted sum of quality features (their fixed-weight reranker, F-RR),
and the best is returned.

Features (`features`, name -> weight): "logprob" (mean token log-probability), "self_certainty" (best_of_n.py),
"mbr_chrf" / "mbr_bleu" / "mbr_rougeL" (expected utility against the other samples: QAD's MBR stage as a feature),
and any quality metric registered with `register_quality(name, fn)`, fn(source, hypothesis) -> float (a
reference-free quality-estimation model such as COMET-QE, which this package does not ship). `metric` adds one
callable (source, hypothesis) -> float with weight 1. The source is the prompt's text.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .base import SampleSearch, check, register, token_logprob
from .best_of_n import mean, self_certainty
from .utilities import UTILITIES, mbr_scores, utility_of

QUALITY: dict[str, Callable[[str, str], float]] = {}  # reference-free metrics: (source, hypothesis) -> quality
TOKEN_FEATURES = {"logprob": token_logprob, "self_certainty": self_certainty}


def register_quality(name: str, metric: Callable[[str, str], float]) -> None:
    """Make a quality metric (source, hypothesis) -> float available as a reranking feature by name."""
    QUALITY[name] = metric


def known_features() -> list[str]:
    return [*TOKEN_FEATURES, *(f"mbr_{u}" for u in UTILITIES), *QUALITY]


@register
@dataclass
class QualityRerank(SampleSearch):
    """Knobs (defaults): `n` (8), `features` ({"logprob": 1.0}: name -> weight), `metric` (None: a callable
    (source, hypothesis) -> float added with weight 1), `arithmetic` (False)."""

    name = "quality_rerank"
    features: dict = field(default_factory=lambda: {"logprob": 1.0})
    metric: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check(isinstance(self.features, dict) and (self.features or self.metric is not None),
              f"{self.name}: features must be a non-empty dict of name -> weight (or give a metric)")
        for name in self.features:
            check(name in known_features(), f"{self.name}: unknown feature {name!r}; known: "
                  f"{', '.join(known_features())}")
        check(self.metric is None or callable(self.metric), f"{self.name}: metric must be a callable")
        token = [f for f in self.features if f in TOKEN_FEATURES]
        check(len(token) <= 1, f"{self.name}: use one of {', '.join(TOKEN_FEATURES)} at a time")
        self.token_feature = token[0] if token else None

    def statistic(self):
        return TOKEN_FEATURES.get(self.token_feature)

    def scores(self, engine, req, results, seqs) -> list[float]:
        source = engine.tokenizer.decode(req.prompt_ids, skip_special_tokens=True)
        texts = [r.text for r in results]
        total = [0.0] * len(results)
        for name, weight in self.features.items():
            if name in TOKEN_FEATURES:
                values = [mean(s.token_stats) for s in seqs]
            elif name.startswith("mbr_"):
                values = mbr_scores(texts, utility_of(name[4:]))
            else:
                values = [QUALITY[name](source, t) for t in texts]
            total = [a + weight * v for a, v in zip(total, values)]
        if self.metric is not None:
            total = [a + self.metric(source, t) for a, t in zip(total, texts)]
        return total
