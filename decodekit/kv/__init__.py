"""KV-cache presses as pure tensor code, per layer and per sequence: eviction (scores -> kept indices),
quantization (pack/unpack with the bytes held), and decode-time sparse attention (which tokens a step reads).

Conventions are in `base.py`; one press a file in `presses/`; `make_press(name, **knobs)` builds one by name.

| name | kind | what the engine hands it | paper |
|---|---|---|---|
| `streaming_llm` | eviction | keys | Xiao et al. 2023 (StreamingLLM) |
| `h2o` | eviction | attn_mass (`accumulate_attention` each step) | Zhang et al. 2023 (H2O) |
| `snapkv` | eviction, at prefill | queries of the last W prompt tokens | Li et al. 2024 (SnapKV) |
| `knorm` | eviction | keys | Devoto et al. 2024 (L2 norm) |
| `ems` | head-wise evict-then-merge | attn_mass, window queries | Li et al. 2024 (EMS) |
| `scope` | budgets for prompt / generated tokens over two scorers | prompt_len + the scorers' inputs | Wu et al. 2024 |
| `kivi` | 2/4-bit quantization | keys, values | Liu et al. 2024 (KIVI) |
| `kvquant` | non-uniform quantization, sparse outliers | pre-RoPE keys (or cos/sin), calibration | Hooper et al. 2024 |
| `gear` | quantization + low-rank + sparse | keys, values | Kang et al. 2024 (GEAR) |
| `rotatekv` | Hadamard-rotated 2-bit quantization | keys, values (rope optional), calibration | Su et al. 2025 |
| `tidal` | decode-time sparse attention, selection layers | decode queries | Yang et al. 2024 (TidalDecode) |
| `quest` | decode-time page selection | decode queries | Tang et al. 2024 (Quest) |
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
