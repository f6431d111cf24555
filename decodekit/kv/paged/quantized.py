"""Quantization presses in the paged cache: old blocks leave the pool and are held packed; attention reads them
dequantized.

A sequence keeps its most recent `residual` entries (at least) in full precision in the pool, as KIVI does. Once
more than `residual + chunk` are there, the oldest whole chunks are packed (`chunk`: a block, KIVI's key groups,
256 tokens for GEAR), one `PackedKV` per layer and chunk
(the press's own `pack`: integers packed several to a byte, scales, outliers, low-rank factors), and their blocks
go back to the pool (`SeqKV.hand_over`: the sequence's first blocks now live outside it). The bytes held are the
packed bytes plus the pool blocks the sequence still owns.

In every pass the press supplies the packed entries to attention: `attend` dequantizes them layer by layer into
the keys and values the row reads (a transient copy of one layer of one sequence: what a fused kernel would do in
registers), and restores their sliding-window visibility from their positions (the pool reads them as scratch).
Such sequences take the masked attention path (no CUDA graphs, fused chunks or decode kernel): the memory is what
this measures, not speed.

Per press: KIVI quantizes keys per channel in groups of `group` tokens, so chunks are whole key groups (and the
press packs them with no recent window of its own: the pool holds that one); KVQuant and RotateKV calibrate per
layer on the first chunk they pack (the paper's offline calibration, done on the sequence's own prompt), and get
the rotary tables to quantize keys before RoPE; GEAR needs nothing more.
"""
from __future__ import annotations

import copy
import math
from dataclasses import replace

import torch

from ..base import PackedKV
from ..presses.gear import GEARPress
from ..presses.kivi import KIVIPress
from ..presses.kvquant import KVQuantPress
from ..presses.rotatekv import RotateKVPress
from .state import PressState, RowObserver, layer_kv

DEFAULT_RESIDUAL = 128
GEAR_CHUNK = 256  # GEAR's low-rank factors ([n, rank] per head) amortise over the tokens packed together


class QuantState(PressState):
    def __init__(self, press, model, prompt_len: int, residual: int, block_size: int, chunk: int | None = None
                 ) -> None:
        super().__init__(press, model, prompt_len)
        self.residual = residual
        unit = math.lcm(block_size, press.group if isinstance(press, KIVIPress) else 1)
        if chunk is None:
            chunk = GEAR_CHUNK if isinstance(press, GEARPress) else unit
        self.chunk = -(-chunk // unit) * unit
        self.takes_rope = isinstance(press, (KVQuantPress, RotateKVPress))
        self.reset()

    def reset(self) -> None:
        # One press per layer: calibrated ones (KVQuant's ranges and codebooks, RotateKV's channel order) differ.
        base = replace(self.press, residual=0) if isinstance(self.press, KIVIPress) else self.press
        self.layer_presses = [copy.deepcopy(base) for _ in range(self.config.num_layers)]
        self.calibrated = False
        self.chunks: list[tuple[list[PackedKV], torch.Tensor]] = []  # per chunk: each layer's pack, positions [n]
        self.packed_len = 0

    # ---- passes -------------------------------------------------------------------------------------------
    def observed(self, kv) -> bool:
        return self.packed_len > 0

    def observer(self, kv, positions: list[int], prefill: bool) -> RowObserver | None:
        return RowObserver(self, kv.length, positions, prefill) if self.packed_len else None

    def rope(self, layer: int, positions: torch.Tensor):
        if not self.takes_rope:
            return None
        m = self.model
        table = m.rope_local if m.layers[layer].attn.local_rope else m.rope_global
        return table[0][positions], table[1][positions]

    def unpack(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        press, keys, values = self.layer_presses[layer], [], []
        for packs, positions in self.chunks:
            rope = self.rope(layer, positions)
            k, v = press.unpack(packs[layer], rope) if rope is not None else press.unpack(packs[layer])
            keys.append(k)
            values.append(v)
        return torch.cat(keys, dim=1), torch.cat(values, dim=1)

    def attend(self, obs: RowObserver, layer: int, q, keys, values, mask, scale: float):
        n = self.packed_len
        k, v = self.unpack(layer)
        keys = torch.cat([k.to(keys.dtype), keys[:, n:]], dim=1)
        values = torch.cat([v.to(values.dtype), values[:, n:]], dim=1)
        window = self.config.layer_window(layer)
        if window is not None:  # the pool's positions of these entries are scratch: use the press's own
            positions = torch.cat([p for _, p in self.chunks])
            q_pos = obs.query_positions(mask.shape[1], mask.device)
            mask = mask.clone()
            mask[:, :, :n] = positions[None, None, :] > q_pos[None, :, None] - window
        return keys, values, mask

    # ---- packing ------------------------------------------------------------------------------------------
    def after_step(self, kv) -> None:
        full_precision = kv.length - self.packed_len
        n = (full_precision - self.residual) // self.chunk * self.chunk
        if n <= 0:
            return
        start = self.packed_len
        packs = []
        positions = None
        rings = getattr(kv.pool, "ring_layers", frozenset())
        for layer, press in enumerate(self.layer_presses):
            if layer in rings:  # its ring holds the window in full precision; nothing to pack
                packs.append(None)
                continue
            keys, values, positions = layer_kv(kv.pool, kv, layer, start, start + n)
            rope = self.rope(layer, positions)
            if not self.calibrated:
                if isinstance(press, KVQuantPress):
                    press.calibrate(keys, values, rope)
                elif isinstance(press, RotateKVPress):
                    press.calibrate(keys, rope)
            packs.append(press.pack(keys, values, rope) if rope is not None else press.pack(keys, values))
            if isinstance(press, RotateKVPress):
                press.n_sink = 0  # the sinks are the sequence's first tokens: later chunks have none
        self.calibrated = True
        self.chunks.append((packs, positions.clone()))
        self.packed_len += n
        kv.hand_over(n // kv.pool.block_size)

    def held_outside(self) -> int:
        return sum(p.nbytes() for packs, _ in self.chunks for p in packs if p is not None)
