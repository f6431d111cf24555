"""Sampling settings: one dataclass, validated once, shared by plain and speculative decoding."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any


@dataclass
class SamplingConfig:
    """How the target's logits become a next-token distribution.

    temperature == 0 means greedy (argmax of the penalized logits); the warpers then do not apply.
    Each warper is off at its default value.
    """

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus (Holtzman et al. 2020)
    min_p: float = 0.0  # min-p (Nguyen et al. 2024)
    typical_p: float = 1.0  # locally typical sampling (Meister et al. 2023)
    epsilon_cutoff: float = 0.0  # epsilon sampling (Hewitt et al. 2022)
    eta_cutoff: float = 0.0  # eta sampling (Hewitt et al. 2022)
    top_h: float = 0.0  # Top-H bounded-entropy sampling; 0 = off, else the entropy fraction in (0, 1]
    repetition_penalty: float = 1.0  # CTRL-style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI-style, over output tokens
    frequency_penalty: float = 0.0  # OpenAI-style, over output tokens
    seed: int | None = None

    @classmethod
    def with_defaults(cls, defaults: Mapping[str, Any], explicit: Mapping[str, Any]) -> "SamplingConfig":
        """The user's `explicit` values over a model's `defaults` (its generation_config.json) over this class's.

        Not validated: call `validate()`. Keys of `defaults` that are not fields here are ignored.
        """
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in defaults.items() if k in names}, **explicit})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def validate(self) -> "SamplingConfig":
        """Raise ValueError with a one-line, user-facing message for any out-of-range value."""
        checks = [
            (self.temperature >= 0.0, f"temperature must be >= 0 (0 = greedy), got {self.temperature}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0 (0 = off), got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (0.0 < self.typical_p <= 1.0, f"typical_p must be in (0, 1], got {self.typical_p}"),
            (0.0 <= self.epsilon_cutoff < 1.0, f"epsilon_cutoff must be in [0, 1), got {self.epsilon_cutoff}"),
            (0.0 <= self.eta_cutoff < 1.0, f"eta_cutoff must be in [0, 1), got {self.eta_cutoff}"),
            (0.0 <= self.top_h <= 1.0, f"top_h must be in [0, 1] (0 = off), got {self.top_h}"),
            (self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2.0 <= self.frequency_penalty <= 2.0, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        return self
