"""Eviction, then quantization: the two presses on one sequence (e.g. `snapkv+kivi`).

The bytes a long context holds shrink by the product of the two: the eviction press keeps a fraction of the prompt's
entries (once, at prefill: entries already packed cannot be evicted, so it must press the prompt only), then the
quantization press packs the kept entries as they age, exactly as it would pack a sequence that was never evicted
(the entries it packs keep their positions). Until the prompt is pressed the eviction press observes the passes
(SnapKV's window queries); after, the quantization press does (its packed entries, dequantized).
"""
from __future__ import annotations

from .state import PressState, RowObserver


class ComposedState(PressState):
    def __init__(self, evict: PressState, quant: PressState) -> None:
        super().__init__(evict.press, evict.model, evict.prompt_len)
        self.evict, self.quant = evict, quant
        self.observes_prefill = evict.observes_prefill

    def _evicted(self) -> bool:
        """The eviction press is done: it pressed the prompt, or keeps everything (R = 0: it never presses)."""
        return self.evict.pressed_prompt or self.evict.inactive

    def _active(self) -> PressState:
        return self.quant if self._evicted() else self.evict

    def observer(self, kv, positions: list[int], prefill: bool) -> RowObserver | None:
        return self._active().observer(kv, positions, prefill)

    def observed(self, kv) -> bool:
        return self._active().observed(kv)

    def after_step(self, kv) -> None:
        self.evict.after_step(kv)
        if self._evicted():
            self.quant.after_step(kv)

    def held_outside(self) -> int:
        return self.quant.held_outside()

    def reset(self) -> None:
        self.evict.reset()
        self.quant.reset()

    def fork(self) -> "ComposedState":
        return ComposedState(self.evict.fork(), self.quant.fork())
