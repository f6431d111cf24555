"""Diverse beam search (Vijayakumar et al. 2018, "Diverse Beam Search: Decoding Diverse Solutions from Neural
Sequence Models"): the beams split into groups that decode one after another at each step, each group's scores
lowered by `diversity_penalty` for every beam of an earlier group that chose the same token at this step (Hamming
diversity), as transformers' group beam search (`num_beam_groups`, `diversity_penalty`). `beam` with those options
is the same search; this name only gives them defaults that make the groups differ.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import register
from .beam import Beam


@register
@dataclass
class DiverseBeam(Beam):
    """Knobs: those of `beam`, with `num_beam_groups` 2 and `diversity_penalty` 0.5 by default."""

    name = "diverse_beam"
    num_beam_groups: int = 2
    diversity_penalty: float = 0.5
