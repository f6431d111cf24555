"""Sampling under a grammar: AWRS (check only the sampled tokens) and the vectorized mask path.

AWRS, "Fast Controlled Generation from Language Models with Adaptive Weighted Rejection Sampling" (Lipkin, LeBrun,
Hoover Vigly, Loula, MacIver, Du, Eisner, Cotterell, Mansinghka, O'Donnell, Lew, Vieira; COLM 2025,
arXiv:2504.05410). Masking asks the grammar about every token of the vocabulary at every step; AWRS draws a token
from p and asks about that token only. On a rejection the token is removed from p and the draw repeated from the
renormalized rest (*adaptive*: sampling without replacement, one exponential-race ordering per run), so the
accepted token is distributed exactly as p masked to the allowed set and renormalized. The cost is the number of
rejections, small when the model already favours conforming tokens.

*Weighted*: the paper's estimate of the allowed mass Z = sum of p over allowed tokens (the importance weight that
sequential Monte Carlo needs to correct locally constrained decoding). A second run continues from the first
run's state (its rejected tokens stay removed) until it too accepts; with R1 the mass rejected in the first run and
N the rejections of both runs, w = (1 - R1) / (N + 1) is unbiased for Z (the paper's Algorithm 2, the form of the
authors' first genlm-control release; `tests/constrain/test_awrs.py` checks E[w] = Z by exact enumeration).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Matcher

_CHUNKS = (16, 512)  # candidates sorted per chunk; AWRS almost always stops inside the first few


@dataclass
class AWRSResult:
    token: int | None  # None: p gives no mass to any allowed token
    weight: float  # estimate of the allowed mass of p (exact when `masked`); 0.0 when token is None
    checks: int  # calls to `Matcher.allows`
    masked: bool = False  # max_rejects was reached and the full mask was used


@dataclass
class AWRS:
    """AWRS sampler knobs (paper: arXiv:2504.05410).

    `weight`: run the paper's second loop to return an unbiased estimate of the allowed mass (off: one run, weight
    0.0 unless the mask was used). `max_rejects`: after this many rejections compute the full mask and sample
    from it (the token is still exactly from the masked distribution; the weight is then the exact mass, so
    weights are unbiased only without a limit). None = never fall back (the paper's algorithm).
    """

    weight: bool = True
    max_rejects: int | None = None

    def sample(self, probs: torch.Tensor, matcher: Matcher, generator: torch.Generator | None = None) -> AWRSResult:
        return awrs_sample(probs, matcher, generator, self.weight, self.max_rejects)


def _race_order(p: torch.Tensor, generator: torch.Generator | None):
    """Token ids in descending p/E order with E ~ Exp(1) i.i.d.: a sample without replacement from p (the
    exponential race, Gumbel-max in another form: log(p/E) = log p + Gumbel), sorted lazily in growing chunks;
    zero-mass tokens never come."""
    keys = p / torch.empty_like(p).exponential_(generator=generator)
    done = 0
    for k in (*_CHUNKS, p.numel()):
        k = min(k, p.numel())
        if k <= done:
            continue
        values, ids = keys.topk(k)
        for v, t in zip(values[done:].tolist(), ids[done:].tolist()):
            if v <= 0:
                return
            yield t
        done = k


def awrs_sample(probs: torch.Tensor, matcher: Matcher, generator: torch.Generator | None = None,
                weight: bool = True, max_rejects: int | None = None) -> AWRSResult:
    """One AWRS draw from `probs` `[V]` (already penalized, tempered and warped) under `matcher` (not advanced).

    The token's distribution is exactly `masked_probs(probs, matcher.allowed())`. See the module docstring and
    `AWRS` for `weight` and `max_rejects`. The generator must live on `probs`' device.
    """
    if probs.dim() != 1:
        raise ValueError(f"awrs_sample takes one distribution [V], got shape {tuple(probs.shape)}")
    p = probs.clone()  # rejected tokens get zero mass here; masses are summed in Python floats (double)
    accepted: set[int] = set()
    checks = rejects = 0
    first_rejected_mass = 0.0
    token = None
    for run in range(2 if weight else 1):
        found = None
        for t in _race_order(p, generator):
            if t not in accepted:
                if max_rejects is not None and rejects >= max_rejects:
                    return _masked_fallback(probs, p, matcher, generator, token, checks)
                checks += 1
                if not matcher.allows(t):
                    rejects += 1
                    mass = float(p[t])
                    if run == 0:
                        first_rejected_mass += mass
                    p[t] = 0.0
                    continue
                accepted.add(t)
            found = t
            break
        if found is None:  # every token p can produce was rejected
            return AWRSResult(None, 0.0, checks)
        if run == 0:
            token = found
    # The paper's estimate, on p's own scale (p need not sum to one): (total - R1) / (N + 1).
    estimate = max(0.0, float(probs.sum()) - first_rejected_mass) / (rejects + 1) if weight else 0.0
    return AWRSResult(token, estimate, checks)


def _masked_fallback(probs: torch.Tensor, p: torch.Tensor, matcher: Matcher, generator: torch.Generator | None,
                     token: int | None, checks: int) -> AWRSResult:
    """Too many rejections: the full mask. Tokens rejected so far are disallowed, so sampling the masked rest is
    still exactly the masked distribution; the allowed mass is then known exactly."""
    allowed = matcher.allowed().to(probs.device)
    mass = float((probs.double() * allowed).sum())
    if mass <= 0.0:
        return AWRSResult(None, 0.0, checks, masked=True)
    if token is None:
        token = int(torch.multinomial(p * allowed, 1, generator=generator))
    return AWRSResult(token, mass, checks, masked=True)


def masked_probs(probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """`probs [..., V]` restricted to `allowed [..., V]` (bool) and renormalized per row.

    A row with no allowed mass comes back all zero (the caller decides: e.g. mask the logits before the warpers
    instead, which cannot cut every allowed token away).
    """
    kept = probs * allowed.to(probs.device)
    total = kept.sum(-1, keepdim=True)
    return torch.where(total > 0, kept / total.clamp(min=torch.finfo(kept.dtype).tiny), kept)
