"""Utilities (similarity of two texts, higher is better) for minimum Bayes risk and reranking: chrF and BLEU from
sacrebleu, ROUGE from rouge-score (`pip install decodekit[search]`)."""
from __future__ import annotations

from functools import lru_cache
from typing import Callable

Utility = Callable[[str, str], float]  # (hypothesis, pseudo-reference) -> similarity


def _chrf(hyp: str, ref: str) -> float:
    from sacrebleu.metrics import CHRF

    return CHRF().sentence_score(hyp, [ref]).score


def _bleu(hyp: str, ref: str) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU(effective_order=True).sentence_score(hyp, [ref]).score


@lru_cache(maxsize=None)
def _rouge_scorer(kind: str):
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=True)


def _rouge(kind: str) -> Utility:
    return lambda hyp, ref: 100.0 * _rouge_scorer(kind).score(ref, hyp)[kind].fmeasure


UTILITIES: dict[str, Utility] = {"chrf": _chrf, "bleu": _bleu, "rouge1": _rouge("rouge1"), "rouge2": _rouge("rouge2"),
                                 "rougeL": _rouge("rougeL")}


def utility_of(spec: str | Utility) -> Utility:
    if callable(spec):
        return spec
    if spec not in UTILITIES:
        raise ValueError(f"unknown utility {spec!r}; available: {', '.join(UTILITIES)} (or a callable)")
    try:
        UTILITIES[spec]("a", "a")
    except ImportError as e:
        raise ValueError(f"utility {spec!r} needs {e.name}: pip install 'decodekit[search]'") from None
    return UTILITIES[spec]


def mbr_scores(texts: list[str], utility: Utility) -> list[float]:
    """Each text's expected utility against the others as pseudo-references (uniform over the samples, the
    sampled estimate of minimum Bayes risk; a lone text scores 0)."""
    n = len(texts)
    if n < 2:
        return [0.0] * n
    return [sum(utility(texts[i], texts[j]) for j in range(n) if j != i) / (n - 1) for i in range(n)]
