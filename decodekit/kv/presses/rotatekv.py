"""RotateKV: rotate keys and values with Hadamard transforms so outliers spread out, then quantize to 2 bits.

Su et al., "RotateKV: Accurate and Robust 2-Bit KV Cache Quantization for LLMs via Outlier-Aware Adaptive Rotations"
(arXiv 2501.16383). An orthonormal Hadamard rotation mixes every channel into every other, so a few outlier
channels no longer set the range of a whole token: after rotation each token is quantized per token (groups of
`group` channels); the inverse rotation (the transpose) is applied on read. What is implemented:
- Outlier-aware rotation: the rotation is block-diagonal (blocks of `block` channels, a power of two; default the
  whole rotated width), and `calibrate` finds a key channel order that deals the channels, largest mean magnitude
  first, round-robin across blocks, so every block gets its share of the outlier channels (keys are where the
  channel outliers are; values use the plain order).
- Grouped-head rotation: `head_group` consecutive key/value heads are rotated together (one `head_group * D` wide
  transform), which also spreads outliers across heads. Keys may be given with `rope=(cos, sin)` to rotate them
  pre-RoPE, as the paper does (the un-rotation and re-rotation are KVQuant's `unrotate`/`rotate`).
- Attention-sink-aware: the first `n_sink` tokens stay in full precision.
Rotation is a change of basis: it costs no stored bytes (the matrix is a function of the sizes; the channel order
is per-layer, `head_group * D` int16 values, counted).

Bytes held (`nbytes`): codes (bits/8 per element), float16 scale and zero per group (4/group bytes per element),
the sink tokens at the cache dtype, and the channel order.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..base import PackedKV, QuantPress, register
from ..quant import check_bits, check_kv, dequantize, hadamard, pack_bits, quantize, unpack_bits
from .kvquant import Rope, rotate, unrotate


def outlier_aware_order(magnitude: torch.Tensor, block: int) -> torch.Tensor:
    """Channel order (`[C]`) dealing channels, largest `magnitude` first, round-robin over the C // block blocks."""
    c = magnitude.numel()
    ranked = magnitude.argsort(descending=True)
    blocks = c // block
    # Rank i goes to block i % blocks, slot i // blocks.
    order = torch.empty_like(ranked)
    i = torch.arange(c, device=ranked.device)
    order[(i % blocks) * block + i // blocks] = ranked
    return order


@register
@dataclass
class RotateKVPress(QuantPress):
    name = "rotatekv"
    bits: int = 2
    group: int = 64  # channels per quantization group after rotation (capped at the rotated width)
    head_group: int = 1  # heads rotated together
    block: int | None = None  # Hadamard block size; None = the whole rotated width
    n_sink: int = 1  # first tokens kept in full precision
    order: torch.Tensor | None = field(default=None, repr=False)  # [head_group * D] channel order, from calibrate

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group < 1 or self.head_group < 1 or self.n_sink < 0:
            raise ValueError(f"need group >= 1, head_group >= 1, n_sink >= 0; got {self.group}, "
                             f"{self.head_group}, {self.n_sink}")

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """`[H, L, D]` -> `[H / head_group, L, head_group * D]`."""
        h, n, d = x.shape
        if h % self.head_group:
            raise ValueError(f"head_group {self.head_group} must divide the number of heads {h}")
        x = x.reshape(h // self.head_group, self.head_group, n, d).transpose(1, 2)
        return x.reshape(-1, n, self.head_group * d)

    def _ungrouped(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        h, n, d = shape
        return x.reshape(h // self.head_group, n, self.head_group, d).transpose(1, 2).reshape(h, n, d)

    def _matrix(self, width: int, device: torch.device, order: torch.Tensor | None) -> torch.Tensor:
        """The rotation (`[width, width]`, applied as x @ R): channel order, then block-diagonal Hadamard."""
        block = width if self.block is None else self.block
        if width % block:
            raise ValueError(f"block {block} must divide the rotated width {width}")
        r = torch.block_diag(*[hadamard(block, device)] * (width // block))
        order = torch.arange(width, device=device) if order is None else order.long().to(device)
        if order.numel() != width:
            raise ValueError(f"calibrated channel order has {order.numel()} channels, the data {width}")
        return r[torch.argsort(order)]  # x @ r[argsort(order)] == x[:, order] @ r

    def calibrate(self, keys: torch.Tensor, rope: Rope | None = None) -> "RotateKVPress":
        """Channel order from calibration keys `[H, L, D]`: outlier channels dealt evenly over Hadamard blocks."""
        k = self._grouped((unrotate(keys, rope) if rope is not None else keys).float())
        width = k.shape[-1]
        block = width if self.block is None else self.block
        self.order = outlier_aware_order(k.abs().mean(dim=(0, 1)), block).to(torch.int16)
        return self

    def _order(self, prefix: str) -> torch.Tensor | None:
        return self.order if prefix == "k" else None

    def _pack_one(self, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        s = min(self.n_sink, x.shape[1])
        rot = self._grouped(x[:, s:].float()) @ self._matrix(self.head_group * x.shape[-1], x.device,
                                                             self._order(prefix))
        codes, scale, zero = quantize(rot, self.bits, dim=2, group=min(self.group, rot.shape[-1]))
        return {f"{prefix}_codes": pack_bits(codes, self.bits), f"{prefix}_scale": scale, f"{prefix}_zero": zero,
                f"{prefix}_sink": x[:, :s].clone()}

    def _unpack_one(self, t: dict[str, torch.Tensor], prefix: str, shape: tuple[int, ...], dtype: torch.dtype
                    ) -> torch.Tensor:
        h, n, d = shape
        sink = t[f"{prefix}_sink"]
        width = self.head_group * d
        codes = unpack_bits(t[f"{prefix}_codes"], self.bits, width)
        rot = dequantize(codes, t[f"{prefix}_scale"], t[f"{prefix}_zero"], 2, min(self.group, width), torch.float32)
        x = rot @ self._matrix(width, rot.device, self._order(prefix)).T  # orthonormal: inverse = transpose
        return torch.cat([sink.float(), self._ungrouped(x, (h, n - sink.shape[1], d))], dim=1).to(dtype)

    def pack(self, keys: torch.Tensor, values: torch.Tensor, rope: Rope | None = None) -> PackedKV:
        check_kv(keys, values)
        k = unrotate(keys, rope).to(keys.dtype) if rope is not None else keys
        tensors = {**self._pack_one(k, "k"), **self._pack_one(values, "v")}
        if self.order is not None:
            tensors["order"] = self.order
        return PackedKV(tensors, {"shape": tuple(keys.shape), "dtype": keys.dtype})

    def unpack(self, packed: PackedKV, rope: Rope | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype = packed.meta["shape"], packed.meta["dtype"]
        k = self._unpack_one(packed.tensors, "k", shape, dtype)
        if rope is not None:
            k = rotate(k, rope).to(dtype)
        return k, self._unpack_one(packed.tensors, "v", shape, dtype)
