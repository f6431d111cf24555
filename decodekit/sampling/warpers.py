"""Truncation rules: float32 logits `[N, V]` in, the same logits with excluded tokens at -inf out.

Each keeps at least the most probable token, so a distribution never becomes empty.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def _keep_sorted(logits: torch.Tensor, remove_sorted: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Apply a removal mask computed in descending-probability order; the top token always stays."""
    remove_sorted[..., 0] = False
    remove = torch.zeros_like(remove_sorted).scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k most probable tokens (Fan et al. 2018, "Hierarchical Neural Story Generation")."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, NEG_INF)


def top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): the smallest set of top tokens whose mass reaches p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = (cum - sorted_logits.softmax(-1)) >= p  # mass before this token already reaches p
    return _keep_sorted(logits, remove, order)


def min_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Min-p sampling (Nguyen et al. 2024): keep tokens with probability >= p * (top probability)."""
    if p <= 0.0:
        return logits
    probs = logits.softmax(-1)
    threshold = p * probs.max(-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def typical(logits: torch.Tensor, mass: float) -> torch.Tensor:
    """Locally typical sampling (Meister et al. 2023): tokens whose surprisal is closest to the entropy, up to `mass`."""
    if mass >= 1.0:
        return logits
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num().sum(-1, keepdim=True)
    deviation = (-logp - entropy).abs()
    sorted_dev, order = deviation.sort(dim=-1)
    cum = probs.gather(-1, order).cumsum(-1)
    # keep tokens up to and including the first whose cumulative mass reaches `mass`
    remove = (cum - probs.gather(-1, order)) >= mass
    remove[..., 0] = False
    removed = torch.zeros_like(remove).scatter(-1, order, remove)
    return logits.masked_fill(removed, NEG_INF)


def epsilon(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """Epsilon sampling (Hewitt et al. 2022, "Truncation Sampling as Language Model Desmoothing"): drop p < eps."""
    if eps <= 0.0:
        return logits
    probs = logits.softmax(-1)
    remove = probs < eps
    remove &= probs < probs.max(-1, keepdim=True).values  # never the top token
    return logits.masked_fill(remove, NEG_INF)


def eta(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """Eta sampling (Hewitt et al. 2022): drop p < min(eps, sqrt(eps) * exp(-entropy))."""
    if eps <= 0.0:
        return logits
    logp = logits.log_softmax(-1)
    probs = logp.exp()
    entropy = -(probs * logp).nan_to_num().sum(-1, keepdim=True)
    threshold = torch.minimum(torch.full_like(entropy, eps), math.sqrt(eps) * torch.exp(-entropy))
    remove = (probs < threshold) & (probs < probs.max(-1, keepdim=True).values)
    return logits.masked_fill(remove, NEG_INF)


def top_h(logits: torch.Tensor, theta: float) -> torch.Tensor:
    """Top-H decoding (Potraghloo et al. 2025, "Top-H Decoding: Adapting the Creativity and Coherence with Bounded
    Entropy in Text Generation"): the entropy-constrained mass maximization solved greedily — add tokens in
    descending probability while the entropy of the renormalized kept set stays <= theta * H(p).
    """
    if theta <= 0.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    logp = probs.clamp_min(1e-30).log()
    entropy = -(probs * logp).sum(-1, keepdim=True)
    # entropy of the top-i set renormalized: H_i = log(S_i) - (sum_j<=i p_j log p_j) / S_i
    mass = probs.cumsum(-1)
    plogp = (probs * logp).cumsum(-1)
    h_kept = mass.log() - plogp / mass
    remove = h_kept > theta * entropy
    # greedy: stop at the first token that breaks the bound (entropy of prefixes is not monotone in general)
    remove = remove.cumsum(-1) > 0
    return _keep_sorted(logits, remove, order)
