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

Sliding-window rings (`models/kv_cache.py`) are packed too, once the prompt is in: from the first entry inside the
window, a ring's entries past the recent `residual` are packed chunk by chunk (`_pack_rings`), a pack is dropped
once its entries left every later query's window, and the ring blocks that hold only packed (or gone) entries go
back to the ring's pool (`SeqKV.release_ring_entries`). A ring layer's row reads entries [first, first + span)
(`ring_slot_table`): `_attend_ring` masks those the ring gave back and fills in the packed ones still inside the
window. (Not during the prompt: a prefill chunk wider than the ring reads it through `Transformer._ring_view`.)

Per press: KIVI quantizes keys per channel in groups of `group` tokens, so chunks are whole key groups (and the
press packs them with no recent window of its own: the pool holds that one); KVQuant and RotateKV calibrate per
layer on the first chunk they pack (the paper's offline calibration, done on the sequence's own prompt), and get
the rotary tables to quantize keys before RoPE; GEAR needs nothing more. KIVI's packs also concatenate exactly
(`concat`), so its chunks of the full pool's layers merge as they accumulate (`_coalesce`): a pass reads O(log n)
packs a layer, not one per chunk.
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
STACKED = -1  # the key of a ring chunk's one pack of all its layers (stacked as heads)
GEAR_CHUNK = 256  # GEAR's low-rank factors ([n, rank] per head) amortise over the tokens packed together


class QuantState(PressState):
    observes_rings = True

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
        self.calibrated: set[int] = set()  # layers whose press has seen its first chunk
        self.chunks: list[tuple[list[PackedKV], torch.Tensor]] = []  # per chunk: each layer's pack, positions [n]
        self.packed_len = 0
        # Sliding-window rings: per ring, its packed chunks (first entry, each of its layers' pack, positions, the
        # last position) and the entry before which the ring no longer holds them.
        self.ring_chunks: dict[int, list[tuple[int, dict[int, PackedKV], torch.Tensor, int]]] = {}
        self.ring_packed: dict[int, int] = {}
        self.ring_layers: dict[int, list[int]] = {}  # ring -> its layers (the order of a stacked pack's heads)

    # ---- passes -------------------------------------------------------------------------------------------
    def observed(self, kv) -> bool:
        return self.packed_len > 0 or any(self.ring_packed.values())

    def observer(self, kv, positions: list[int], prefill: bool) -> RowObserver | None:
        if not self.observed(kv):
            return None
        obs = RowObserver(self, kv.length, positions, prefill)
        obs.ring_of = {i: (r, ring.span) for r, ring in enumerate(getattr(kv.pool, "rings", ())) for i in ring.layers}
        return obs

    def rope(self, layer: int, positions: torch.Tensor):
        if not self.takes_rope:
            return None
        m = self.model
        table = m.rope_local if m.layers[layer].attn.local_rope else m.rope_global
        return table[0][positions], table[1][positions]

    def _unpack(self, layer: int, packed: PackedKV, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rope = self.rope(layer, positions)
        press = self.layer_presses[layer]
        return press.unpack(packed, rope) if rope is not None else press.unpack(packed)

    def attend(self, obs: RowObserver, layer: int, q, keys, values, mask, scale: float):
        if layer in obs.ring_of:
            return self._attend_ring(obs, layer, keys, values, mask)
        n = self.packed_len
        if not n:
            return keys, values, mask
        k, v = self.full_layer(layer)
        keys = torch.cat([k.to(keys.dtype), keys[:, n:]], dim=1)
        values = torch.cat([v.to(values.dtype), values[:, n:]], dim=1)
        window = self.config.layer_window(layer)
        if window is not None:  # the pool's positions of these entries are scratch: use the press's own
            positions = torch.cat([p for _, p in self.chunks])
            q_pos = obs.query_positions(mask.shape[1], mask.device)
            mask = mask.clone()
            mask[:, :, :n] = positions[None, None, :] > q_pos[None, :, None] - window
        return keys, values, mask

    def _attend_ring(self, obs: RowObserver, layer: int, keys, values, mask):
        """A ring layer's columns are entries [first, first + span) (`kv_cache.ring_slot_table`; a pass wider than
        the ring reads the span before its own entries, then those): the ring no longer holds the entries before
        `ring_packed`; the packed ones inside the window are read dequantized, the rest are masked."""
        r, span = obs.ring_of[layer]
        end = self.ring_packed.get(r, 0)
        width = len(obs.positions)
        first = max(0, (obs.ctx + width if keys.shape[1] == span else obs.ctx) - span)
        if end <= first:
            return keys, values, mask
        keys, values, mask = keys.clone(), values.clone(), mask.clone()
        mask[:, :, :end - first] = False
        chunks = self.ring_chunks[r]
        base, held = (chunks[0][0], chunks[-1][0] + chunks[-1][2].numel()) if chunks else (end, end)
        lo = max(base, first)
        if lo < held:  # the packed entries [base, held) still inside some window: one contiguous run of columns
            k, v, positions = self._ring_window(obs, r, layer)
            q_pos = obs.query_positions(mask.shape[1], mask.device)
            cols = slice(lo - first, held - first)
            keys[:, cols] = k[:, lo - base:].to(keys.dtype)
            values[:, cols] = v[:, lo - base:].to(values.dtype)
            window = self.config.layer_window(layer)
            mask[:, :, cols] = positions[None, None, lo - base:] > q_pos[None, :, None] - window
        return keys, values, mask

    def _ring_window(self, obs: RowObserver, r: int, layer: int):
        """Keys, values `[H_kv, n, D]` and positions `[n]` of ring `r`'s packed entries still held, in `layer` (its
        chunks are consecutive entries), dequantized once a pass and kept in the observer's scratch (a transient of
        the window's size); a chunk packed with the ring's layers stacked as heads is unpacked once for all of them
        and sliced per layer."""
        chunks = self.ring_chunks[r]
        stacked = STACKED in chunks[0][1]
        key = ("ring", r) if stacked else ("ring", r, layer)
        if key not in obs.scratch:
            source = self.ring_layers[r][0] if stacked else layer
            parts = [self._unpack(source, packs[STACKED if stacked else layer], pos) for _, packs, pos, _ in chunks]
            obs.scratch[key] = (torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1),
                                torch.cat([pos for _, _, pos, _ in chunks]))
        k, v, positions = obs.scratch[key]
        if stacked:
            h, row = self.config.num_kv_heads, self.ring_layers[r].index(layer)
            k, v = k[row * h:(row + 1) * h], v[row * h:(row + 1) * h]
        return k, v, positions

    # ---- packing ------------------------------------------------------------------------------------------
    def _pack(self, layer: int, start: int, keys, values, positions: torch.Tensor) -> PackedKV:
        """Entries [start, start + n) of `layer` (its keys and values `[H_kv, n, D]`, their positions) packed; the
        press calibrates on its first chunk (KVQuant's ranges and codebooks, RotateKV's channel order)."""
        press, rope = self.layer_presses[layer], self.rope(layer, positions)
        if layer not in self.calibrated:
            if isinstance(press, KVQuantPress):
                press.calibrate(keys, values, rope)
            elif isinstance(press, RotateKVPress):
                press.calibrate(keys, rope)
            self.calibrated.add(layer)
        if isinstance(press, RotateKVPress) and start > 0:
            press.n_sink = 0  # the sinks are the sequence's first tokens: later chunks have none
        return press.pack(keys, values, rope) if rope is not None else press.pack(keys, values)

    def after_step(self, kv) -> None:
        self._pack_full(kv)
        self._pack_rings(kv)

    def _pack_full(self, kv) -> None:
        """The full pool's layers: the oldest whole chunks past the recent `residual` leave the pool, packed."""
        full_precision = kv.length - self.packed_len
        n = (full_precision - self.residual) // self.chunk * self.chunk
        if n <= 0:
            return
        start = self.packed_len
        packs: list[PackedKV | None] = []
        positions = None
        rings = getattr(kv.pool, "ring_layers", frozenset())
        for layer in range(self.config.num_layers):
            if layer in rings:  # packed apart (`_pack_rings`): a ring holds the window only
                packs.append(None)
                continue
            keys, values, positions = layer_kv(kv.pool, kv, layer, start, start + n)
            packs.append(self._pack(layer, start, keys, values, positions))
        self.chunks.append((packs, positions.clone()))
        self.packed_len += n
        kv.hand_over(n // kv.pool.block_size)
        self._coalesce()

    def _coalesce(self) -> None:
        """Merge the last two chunks while they are the same size (a binary counter: O(log n) chunks), where the press
        concatenates packs exactly (KIVI): attention dequantizes every chunk of every layer in every pass, and a 32k
        context in 32-token chunks would be a thousand small reads a layer. Bytes held do not change."""
        if not hasattr(self.press, "concat"):
            return
        while len(self.chunks) >= 2 and self.chunks[-1][1].numel() == self.chunks[-2][1].numel():
            (a, pa), (b, pb) = self.chunks[-2:]
            merged = [None if x is None else self.layer_presses[i].concat([x, y]) for i, (x, y) in enumerate(zip(a, b))]
            self.chunks[-2:] = [(merged, torch.cat([pa, pb]))]

    def full_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values `[H_kv, packed_len, D]` of the packed entries of a full-pool layer, dequantized."""
        return tuple(torch.cat(t, dim=1) for t in zip(*(self._unpack(layer, packs[layer], positions)
                                                       for packs, positions in self.chunks)))

    def _pack_rings(self, kv) -> None:
        """Sliding-window rings, once the prompt is in: the ring's entries past the recent `residual` are packed
        chunk by chunk from the first one inside the window, packs whose entries left every later query's window
        are dropped, and the ring blocks of what is packed or gone go back (`SeqKV.release_ring_entries`). (Not
        during the prompt: a prefill chunk wider than the ring reads it through `Transformer._ring_view`.)"""
        rings = getattr(kv.pool, "rings", ())
        if not rings or kv.written < self.prompt_len or not kv.length:
            return
        for r, ring in enumerate(rings):
            window = self.config.layer_window(ring.layers[0])
            last = torch.tensor(kv.ring_slots(r, [kv.length - 1]), device=ring.slot_pos.device)
            horizon = int(ring.slot_pos[last]) + 1 - window  # positions at or before it: outside every later window
            start = self.ring_packed.get(r)
            if start is None:  # from the first entry inside the window (entries are in position order)
                lo = max(0, kv.length - ring.span)
                held = torch.tensor(kv.ring_slots(r, range(lo, kv.length)), device=ring.slot_pos.device)
                start = lo + int((ring.slot_pos[held] <= horizon).sum())
                self.ring_layers[r] = list(ring.layers)
            chunks = self.ring_chunks.setdefault(r, [])
            # A press that packs each head on its own (KIVI) packs the ring's layers at once, stacked as heads: the
            # same codes and bytes, and one unpack a pass instead of one per layer (`_ring_chunk`).
            stack = getattr(self.press, "heads_apart", False)
            while kv.length - start >= self.residual + self.chunk:
                slots = torch.tensor(kv.ring_slots(r, range(start, start + self.chunk)), device=ring.k.device)
                positions = ring.slot_pos[slots].clone()
                kvs = {layer: tuple(t[slots].transpose(0, 1) for t in kv.pool.layer_store(layer))
                       for layer in ring.layers}
                if stack:
                    keys, values = (torch.cat(t, dim=0) for t in zip(*kvs.values()))
                    packs = {STACKED: self._pack(ring.layers[0], start, keys, values, positions)}
                else:
                    packs = {layer: self._pack(layer, start, k, v, positions) for layer, (k, v) in kvs.items()}
                chunks.append((start, packs, positions, int(positions[-1])))
                start += self.chunk
            chunks[:] = [c for c in chunks if c[3] > horizon]  # (its last entry's position: the largest)
            self.ring_packed[r] = start
            kv.release_ring_entries(r, start)

    def held_outside(self) -> int:
        return sum(p.nbytes() for packs, _ in self.chunks for p in packs if p is not None) + sum(
            p.nbytes() for chunks in self.ring_chunks.values() for _, packs, *_ in chunks for p in packs.values())
