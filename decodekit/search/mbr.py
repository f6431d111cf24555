"""Minimum Bayes risk decoding over n samples (Eikema and Aziz 2020, "Is MAP Decoding All You Need?"; Bertsch et
al. 2023, "It's MBR All the Way Down"; Wu et al. 2025, "Better Instruction-Following Through Minimum Bayes Risk"):
the sample with the highest mean utility (chrF by default) against the other samples. `best_of_n` with
`scorer="mbr"`, under its own name.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .best_of_n import BestOfN


@register
@dataclass
class MBR(BestOfN):
    """Knobs: `n` (8), `utility` ("chrf" | "bleu" | "rouge1" | "rouge2" | "rougeL" | a callable), `arithmetic`."""

    name = "mbr"
    scorer: str = "mbr"
