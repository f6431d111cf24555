"""KV-cache presses as pure tensor code, per layer and per sequence: eviction (scores -> kept indices),
quantization (pack/unpack with the bytes held), and decode-time sparse attention (which tokens a step reads).

Conventions are in `base.py`; one press a file in `presses/`; `make_press(name, **knobs)` builds one by name.
"""
from .base import PRESSES, LayerKV, PackedKV, Press, QuantPress, ScorerPress, make_press, reduce_headwise, register
from . import presses  # noqa: F401  (registers every press)
from .presses.ems import EMSPress, HeadwiseKV
from .presses.gear import GEARPress
from .presses.h2o import H2OPress, accumulate_attention
from .presses.kivi import KIVIPress
from .presses.knorm import KnormPress
from .presses.kvquant import KVQuantPress
from .presses.quest import QuestPress
from .presses.rotatekv import RotateKVPress
from .presses.scope import ScopePress
from .presses.snapkv import SnapKVPress
from .presses.streaming_llm import StreamingLLMPress
from .presses.tidal import TidalDecode

__all__ = ["PRESSES", "LayerKV", "PackedKV", "Press", "QuantPress", "ScorerPress", "make_press", "reduce_headwise",
           "register", "EMSPress", "HeadwiseKV", "GEARPress", "H2OPress", "accumulate_attention", "KIVIPress",
           "KnormPress", "KVQuantPress", "QuestPress", "RotateKVPress", "ScopePress", "SnapKVPress",
           "StreamingLLMPress", "TidalDecode"]
