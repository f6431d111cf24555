"""SCOPE: separate KV budgets for the prompt (prefill) and for the generated tokens (decoding).

Wu et al., "SCOPE: Optimizing Key-Value Cache Compression in Long-context Generation" (arXiv 2412.13649). Long
outputs make a single budget evict prompt tokens for generated ones, or the reverse; SCOPE decouples the phases.
This press is a policy over two scorers with two budgets (token counts; the scorers' own compression ratios are
not used): `prefill` (any `ScorerPress`, default SnapKV) keeps `prefill_budget` prompt tokens, `decode` (default
H2O: heavy hitters plus a recent window, the paper's "slide" strategy) keeps `decode_budget` generated tokens. Each
side is selected only among its own tokens, so generated tokens never evict prompt tokens and the reverse. Which
tokens are the prompt's comes from `LayerKV.prompt_len` (positions below it). A side within its budget is kept
whole without scoring, so the prompt is scored once, at prefill, when the window queries are the prompt's last
tokens (what SnapKV expects); calling `select` again after that is idempotent on the prompt side. Once tokens
have been generated, the window queries are no longer the prompt's, so a prompt over its budget is an error for a
prefill scorer that needs them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base import LayerKV, Press, ScorerPress, register
from .h2o import H2OPress
from .snapkv import SnapKVPress


@register
@dataclass
class ScopePress(Press):
    name = "scope"
    prefill: ScorerPress = field(default_factory=SnapKVPress)  # ranks prompt tokens
    decode: ScorerPress = field(default_factory=H2OPress)  # ranks generated tokens
    prefill_budget: int = 1024  # slots for prompt tokens
    decode_budget: int = 256  # slots for generated tokens

    def __post_init__(self) -> None:
        if self.prefill_budget < 0 or self.decode_budget < 0:
            raise ValueError(f"budgets must be >= 0, got prefill_budget={self.prefill_budget}, "
                             f"decode_budget={self.decode_budget}")
        for press in (self.prefill, self.decode):
            if not isinstance(press, ScorerPress):
                raise ValueError(f"scope composes scorer presses, got {type(press).__name__}")

    def select(self, kv: LayerKV) -> torch.Tensor:
        """Sorted indices: the prefill scorer's choice among prompt tokens, the decode scorer's among the rest."""
        if kv.prompt_len is None:
            raise ValueError("the scope press needs prompt_len (positions below it are the prompt's)")
        is_prompt = kv.positions < kv.prompt_len
        parts = []
        for mask, press, budget in ((is_prompt, self.prefill, self.prefill_budget),
                                    (~is_prompt, self.decode, self.decode_budget)):
            idx = mask.nonzero()[:, 0]
            if idx.numel() > budget:
                idx = idx[press.select(kv.gather(idx), budget)] if budget else idx[:0]
            parts.append(idx)
        return torch.cat(parts).sort().values

    def compress(self, kv: LayerKV) -> LayerKV:
        return kv.gather(self.select(kv))
