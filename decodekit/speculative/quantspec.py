"""QuantSpec: self-speculation with a 4-bit quantized KV cache of the same model.

Tiwari et al., "QuantSpec: Self-Speculative Decoding with Hierarchical Quantized KV Cache" (arXiv 2502.10424).
The draft is the target reading its KV cache quantized to 4 bits (a quarter of the bytes of a 16-bit cache, so a
draft step of a long context reads about a quarter of the memory), which drafts the target's own tokens with very
high acceptance; the full-precision cache verifies. The quantizer here is KIVI's (keys per channel, values per
token, `group` tokens or channels a group; Liu et al. 2024) with a full-precision window of the `residual` most
recent tokens, as QuantSpec's. Not implemented: QuantSpec's hierarchical layout (the upper 4 bits of an 8-bit
cache that the target reads in full) and its 4-bit weights: here the target verifies with its own full cache.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..kv.paged.quantized import QuantState
from ..kv.presses.kivi import KIVIPress
from .base import register
from .compressed import CompressedDrafter


@register
@dataclass
class QuantSpec(CompressedDrafter):
    """Knobs (defaults): `bits` (4), `group` (32: tokens per key group, channels per value group), `residual`
    (128: recent tokens kept in full precision), `num_draft` (4: max chain length), `stop_threshold` (0.0)."""

    name = "quantspec"
    bits: int = 4
    group: int = 32
    residual: int = 128
    num_draft: int = 4
    stop_threshold: float = 0.0

    def __post_init__(self) -> None:
        KIVIPress(bits=self.bits, group=self.group, residual=self.residual)  # validates the knobs
        self._setup()

    def _state(self, prompt_len: int) -> QuantState:
        press = KIVIPress(bits=self.bits, group=self.group, residual=self.residual)
        return QuantState(press, self.net, prompt_len, self.residual, self._own_pool().block_size)
