"""KV presses inside the engine's paged cache: a request names a press; each of its sequences gets a `PressState`.

`PressSpec` is what a request carries (validated when the request is made): the press's name, the compression
ratio R (the fraction of the KV cache removed, kvpress's convention), the press's own knobs, and two engine knobs:
- `compress_every` (eviction presses): while decoding, press again whenever the entries held exceed the target by
  this many (default 32 for `streaming_llm`, `h2o`, `scope`, whose papers keep a budget as the output grows; 0 for
  `snapkv`, `knorm`, `ems`, which press the prompt once);
- `residual` (quantization presses): recent entries kept in full precision in the pool (KIVI's own knob of that
  name; default 128 for the others); `chunk`: tokens packed together (default: a block, whole KIVI key groups,
  256 for GEAR).
What R means per kind: eviction keeps `kept_count(tokens, R)` entries (SCOPE: its budgets, derived from R unless
given: the prompt's and max_new_tokens' kept counts); sparse attention reads `kept_count(entries, R)` per head (an
explicit `token_budget` wins); quantization presses take no R (their bits set the size: R must be 0).

Two presses compose as "EVICT+QUANT" (e.g. `snapkv+kivi`): the eviction press keeps `kept_count(prompt, R)` of the
prompt's entries once, at prefill, then the quantization press packs what was kept as it ages (`ComposedState`).
Each knob goes to the press that has it (the engine's: `compress_every` to the eviction press, which must press
the prompt only, `compress_every=0`; `residual` and `chunk` to the quantization press).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from ..base import PRESSES, QuantPress, ScorerPress, check_ratio, kept_count, make_press
from ..presses.quest import QuestPress
from ..presses.scope import ScopePress
from ..presses.tidal import TidalDecode
from .composed import ComposedState
from .eviction import DECODE_PRESSES, DEFAULT_EVERY, EvictionState
from .quantized import DEFAULT_RESIDUAL, QuantState
from .sparse import SparseState
from .state import PressState, RowObserver

ENGINE_KNOBS = ("compress_every", "residual", "chunk")


def press_knobs(name: str) -> set[str]:
    """Every knob a press accepts through the engine: its dataclass fields and the engine's own."""
    if "+" in name:
        return set().union(*(press_knobs(part) for part in name.split("+")))
    cls = PRESSES.get(name)
    own = {f.name for f in fields(cls)} if cls is not None and is_dataclass(cls) else set()
    return own | set(ENGINE_KNOBS)


@dataclass
class PressSpec:
    name: str
    compression_ratio: float = 0.0
    knobs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_ratio(self.compression_ratio)
        self.parts: list[PressSpec] = []
        if "+" in self.name:
            self.parts = composed_parts(self.name, self.compression_ratio, self.knobs)
            return
        knobs = dict(self.knobs)
        self.every = knobs.pop("compress_every", None)
        self.chunk = knobs.pop("chunk", None)
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {self.chunk}")
        residual = knobs.pop("residual", None) if self.name != "kivi" else knobs.get("residual")
        self.press_knobs = knobs
        try:
            press = make_press(self.name, **knobs)  # unknown names and knobs: one-line errors here
        except TypeError as error:  # a knob of the wrong type, caught by the press's own checks
            raise ValueError(f"press {self.name!r}: a knob has the wrong type ({error})") from None
        if isinstance(press, QuantPress):
            if self.compression_ratio:
                raise ValueError(f"press {self.name!r} quantizes (its bits set the size): compression_ratio applies "
                                 "to eviction and sparse presses; leave it at 0")
            self.residual = press.residual if self.name == "kivi" else \
                (DEFAULT_RESIDUAL if residual is None else int(residual))
            if self.residual < 0:
                raise ValueError(f"residual must be >= 0, got {self.residual}")
        elif isinstance(press, (ScorerPress, ScopePress)):
            if self.every is None:
                self.every = DEFAULT_EVERY if self.name in DECODE_PRESSES else 0
            if self.every < 0:
                raise ValueError(f"compress_every must be >= 0, got {self.every}")
        elif not isinstance(press, (TidalDecode, QuestPress)):
            raise ValueError(f"press {self.name!r} cannot run in the engine")

    def check_rings(self, ring_layers: frozenset[int], num_layers: int) -> None:
        """Refuse (ValueError) what this press cannot do when the pool keeps `ring_layers` in sliding-window rings
        (presses score and select in the full pool's layers: `state.py`)."""
        if self.parts:
            for part in self.parts:
                part.check_rings(ring_layers, num_layers)
            return
        press = make_press(self.name, **self.press_knobs)
        fix = "load with window_ring=False to keep every entry of those layers"
        active = self.compression_ratio > 0 or "token_budget" in self.press_knobs  # (sparse presses; R = 0: idle)
        if isinstance(press, TidalDecode) and active and set(press.selection_layers) & ring_layers:
            raise ValueError(f"press 'tidal' selects in layers {sorted(set(press.selection_layers) & ring_layers)}, "
                             f"which keep only their sliding window (a ring): choose full-attention selection layers "
                             f"or {fix}")
        if len(ring_layers) == num_layers and not isinstance(press, (TidalDecode, QuestPress)):
            raise ValueError(f"press {self.name!r} needs full-attention layers; every layer keeps only its sliding "
                             f"window (a ring): {fix}")

    def state(self, model, prompt_len: int, max_new_tokens: int, block_size: int) -> PressState:
        """A fresh press state for one sequence of `model`."""
        if self.parts:
            return ComposedState(*(part.state(model, prompt_len, max_new_tokens, block_size) for part in self.parts))
        press = make_press(self.name, **self.press_knobs)
        if hasattr(press, "scale") and press.scale is None:  # the model's own attention scale (Gemma's differs)
            press.scale = model.config.scale
        if isinstance(press, ScopePress):
            for side in (press.prefill, press.decode):
                if hasattr(side, "scale") and side.scale is None:
                    side.scale = model.config.scale
        r = self.compression_ratio
        if isinstance(press, QuantPress):
            return QuantState(press, model, prompt_len, self.residual, block_size, self.chunk)
        if isinstance(press, (TidalDecode, QuestPress)):
            budget = press.token_budget if "token_budget" in self.press_knobs else None
            return SparseState(press, model, prompt_len, r, budget)
        budgets = None
        if isinstance(press, ScopePress):
            budgets = (press.prefill_budget if "prefill_budget" in self.press_knobs or not r
                       else kept_count(prompt_len, r),
                       press.decode_budget if "decode_budget" in self.press_knobs or not r
                       else kept_count(max_new_tokens, r))
            if not r and not {"prefill_budget", "decode_budget"} & set(self.press_knobs):
                budgets = None  # R = 0 and no budget given: keep everything
        return EvictionState(press, model, prompt_len, r, self.every, budgets)


def composed_parts(name: str, ratio: float, knobs: dict[str, Any]) -> list[PressSpec]:
    """The two specs of "EVICT+QUANT": each knob to the press that takes it, R to the eviction press."""
    names = name.split("+")
    if len(names) != 2 or not all(n in PRESSES for n in names) or not issubclass(PRESSES[names[0]], ScorerPress) \
            or not issubclass(PRESSES[names[1]], QuantPress):
        evicting = ", ".join(sorted(n for n, c in PRESSES.items() if issubclass(c, ScorerPress)))
        quantizing = ", ".join(sorted(n for n, c in PRESSES.items() if issubclass(c, QuantPress)))
        raise ValueError(f"press {name!r}: presses compose as EVICT+QUANT, an eviction press that scores tokens "
                         f"({evicting}) then a quantization press ({quantizing})")
    engine_knobs = ({"compress_every"}, {"residual", "chunk"})  # of the eviction press, of the quantization press
    own = [(press_knobs(n) - set(ENGINE_KNOBS)) | engine_knobs[i] for i, n in enumerate(names)]
    both = sorted(set(knobs) & own[0] & own[1])
    if both:
        raise ValueError(f"press {name!r}: knob {both[0]!r} belongs to both presses; compose presses whose knobs differ")
    unknown = sorted(set(knobs) - own[0] - own[1])
    if unknown:
        raise ValueError(f"press {name!r}: unknown knob {unknown[0]!r}")
    evict = PressSpec(names[0], ratio, {k: v for k, v in knobs.items() if k in own[0]})
    if evict.every:
        raise ValueError(f"press {name!r}: the eviction press must press the prompt only (compress_every=0, "
                         f"{names[0]!r} defaults to {evict.every}): entries already packed cannot be evicted")
    return [evict, PressSpec(names[1], 0.0, {k: v for k, v in knobs.items() if k in own[1]})]


__all__ = ["ENGINE_KNOBS", "PressSpec", "PressState", "RowObserver", "press_knobs"]
