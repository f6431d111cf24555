"""Sampling: logits -> penalties -> temperature -> truncation warpers -> distribution -> token."""
from .config import SamplingConfig
from .penalties import apply_penalties, token_counts
from .processor import LogitsProcessor
from .warpers import epsilon, eta, min_p, top_h, top_k, top_p, typical

__all__ = ["SamplingConfig", "LogitsProcessor", "apply_penalties", "token_counts", "top_k", "top_p", "min_p",
           "typical", "epsilon", "eta", "top_h"]
