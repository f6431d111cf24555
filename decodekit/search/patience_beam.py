"""Beam decoding with controlled patience (Kasai et al. 2022, "Beam Decoding with Controlled Patience").

First-come-first-served beam search (transformers' `early_stopping=True`) stops as soon as `num_beams` hypotheses
have finished. The patience factor p decouples the two: the beam stays `num_beams` wide, but the search stops only
once round(p x num_beams) hypotheses have finished (the best of them is returned). p = 1 is exactly FCFS beam
search; p > 1 searches longer (the paper finds p = 2 better for summarization and translation), p < 1 shorter.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import check, register
from .beam import Beam


@register
@dataclass
class PatienceBeam(Beam):
    """Knobs: those of `beam` (`early_stopping` True by default: first come, first served), and `patience` (2.0:
    the finished queue holds round(patience x num_beams) hypotheses, at least one)."""

    name = "patience_beam"
    early_stopping: bool | str = True
    patience: float = 2.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.patience > 0, f"{self.name}: patience must be > 0, got {self.patience}")

    def finished_slots(self, group_size: int) -> int:
        return max(1, round(self.patience * group_size))
