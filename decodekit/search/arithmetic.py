"""Arithmetic sampling (Vilnis et al. 2023, "Arithmetic Sampling: Parallel Diverse Decoding for Large Language
Models").

Ancestral sampling with one uniform number per sequence, the *code*: each draw takes the token whose interval of the
cumulative distribution (tokens in id order) holds the code, and the code is rescaled to that interval for the next
draw. A code drawn uniformly gives an exact sample of the model's distribution; the n samples of a prompt get the
codes of a randomly shifted lattice, (u + i / n) mod 1, so they spread over the distribution like stratified
samples (a token of probability p starts floor(n p) or ceil(n p) of them) while each is still an exact sample.
Codes are exact rationals (kept to 256 bits), so they do not lose precision over long outputs.

`search="arithmetic"` draws n samples so and returns the one with the best mean log-probability (all of them with
`return_all`); every n-sample strategy takes `arithmetic=True` to draw its samples with codes. The draws are the
sequences' own (`Sequence.draws`): with a speculative method a draft token is accepted when the code's draw there
equals it, so each sample is still an exact sample, and the one drawn without a draft as long as the logits agree to
the last bit (a code is rescaled by each token's probability: after enough tokens the rounding of passes of
different widths decides which token a code lands on).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from fractions import Fraction

import torch

from .base import register
from .best_of_n import BestOfN

PRECISION = 1 << 256  # code resolution: far below any product of probabilities a generation reaches


class ArithmeticCode:
    """One sample's code in [0, 1); `sample(probs)` draws with it and rescales it."""

    def __init__(self, code: Fraction) -> None:
        self.code = code

    def sample(self, probs: torch.Tensor) -> int:
        cdf = probs.double().cumsum(0).cpu()
        target = self.code * Fraction(float(cdf[-1]))  # the distribution's own total (rounding: not exactly 1)
        last = len(cdf) - 1
        v = min(int(torch.searchsorted(cdf, float(target), right=True)), last)
        bound = lambda i: Fraction(float(cdf[i])) if i >= 0 else Fraction(0)  # noqa: E731
        while v > 0 and target < bound(v - 1):  # float rounding of the search: settle it exactly
            v -= 1
        while v < last and target >= bound(v):
            v += 1
        lo, hi = bound(v - 1), bound(v)
        code = (target - lo) / (hi - lo) if hi > lo else Fraction(0)
        self.code = Fraction(int(code * PRECISION), PRECISION)
        return v


def lattice(n: int, seed: int | None):
    """`draws(index)` for a request of n samples: codes (u + index / n) mod 1 with one uniform offset u."""
    rng = random.Random(seed) if seed is not None else random.SystemRandom()
    offset = Fraction(rng.getrandbits(64), 1 << 64)
    return lambda index: ArithmeticCode((offset + Fraction(index, n)) % 1)


@register
@dataclass
class Arithmetic(BestOfN):
    """Knobs: `n` (8 samples), `scorer` ("logprob": the sample returned is the one with the best mean
    log-probability; any best_of_n scorer), with arithmetic codes (`arithmetic` True)."""

    name = "arithmetic"
    scorer: str = "logprob"
    arithmetic: bool = True
