"""GEAR: uniform quantization, plus a low-rank approximation of its residual, plus sparse outliers.

Kang et al., "GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless Generative Inference of LLM"
(arXiv 2403.05527). Per head, the `[L, D]` matrix X (keys, and separately values) is stored as X ~ S + D + L:
- S: the `outlier_fraction` largest-magnitude entries of the head, kept exactly (sparse: int32 index + value);
- D: X - S quantized uniformly (asymmetric, `bits`, per token in groups of `group` channels);
- L: the best rank-`rank` approximation (truncated SVD) of the residual X - S - D, stored as two factors
  `[L, rank]` and `[rank, D]` at the cache dtype. The quantization error of a matrix with a low-rank structure is
  itself largely low-rank (per-token scales follow the structure), which is what L recovers.
The paper computes L with a few power iterations for speed; an exact SVD is the same approximation, done better.

Bytes held (`nbytes`): codes (bits/8 per element), float16 scale and zero per group (4/group bytes per element),
the factors ((L + D) * rank per head at the cache dtype) and 4 + dtype bytes per outlier.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..base import PackedKV, QuantPress, register
from ..quant import (add_outliers, check_bits, check_kv, dequantize, pack_bits, quantize, split_outliers,
                     unpack_bits)


@register
@dataclass
class GEARPress(QuantPress):
    name = "gear"
    bits: int = 4
    group: int = 64  # channels per quantization group (capped at head_dim)
    rank: int = 4  # rank of the residual's approximation (0 = none)
    outlier_fraction: float = 0.02  # share of each head's entries kept exactly (0 = none)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group < 1 or self.rank < 0 or not 0.0 <= self.outlier_fraction < 1.0:
            raise ValueError(f"need group >= 1, rank >= 0, outlier_fraction in [0, 1); got {self.group}, "
                             f"{self.rank}, {self.outlier_fraction}")

    def _pack_one(self, x: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
        h, n, d = x.shape
        xf = x.float()
        n_out = math.floor(self.outlier_fraction * n * d)
        outlier = torch.zeros(h, n * d, dtype=torch.bool, device=x.device)
        if n_out:
            outlier.scatter_(1, xf.abs().reshape(h, -1).topk(n_out, dim=-1).indices, True)
        dense, sparse = split_outliers(xf, outlier.reshape(h, n, d), x.dtype)
        g = min(self.group, d)
        codes, scale, zero = quantize(dense, self.bits, dim=2, group=g)
        # Outliers overwrite their places on unpack, so their part of the residual needs no approximation.
        residual = dense - dequantize(codes, scale, zero, 2, g, torch.float32)
        residual = residual.masked_fill(outlier.reshape(h, n, d), 0)
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        r = min(self.rank, n, d)
        return {f"{prefix}_codes": pack_bits(codes, self.bits), f"{prefix}_scale": scale, f"{prefix}_zero": zero,
                f"{prefix}_a": (u[..., :r] * s[:, None, :r]).to(x.dtype), f"{prefix}_b": vh[:, :r].to(x.dtype),
                f"{prefix}_out_index": sparse["index"], f"{prefix}_out_value": sparse["value"]}

    def _unpack_one(self, t: dict[str, torch.Tensor], prefix: str, shape: tuple[int, ...], dtype: torch.dtype
                    ) -> torch.Tensor:
        d = shape[2]
        g = min(self.group, d)
        x = dequantize(unpack_bits(t[f"{prefix}_codes"], self.bits, d), t[f"{prefix}_scale"], t[f"{prefix}_zero"],
                       2, g, torch.float32)
        x = x + t[f"{prefix}_a"].float() @ t[f"{prefix}_b"].float()
        # Outliers are exact: they overwrite whatever the dense and low-rank parts put at their places.
        return add_outliers(x, {"index": t[f"{prefix}_out_index"], "value": t[f"{prefix}_out_value"]}).to(dtype)

    def pack(self, keys: torch.Tensor, values: torch.Tensor) -> PackedKV:
        check_kv(keys, values)
        return PackedKV({**self._pack_one(keys, "k"), **self._pack_one(values, "v")},
                        {"shape": tuple(keys.shape), "dtype": keys.dtype})

    def unpack(self, packed: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
        shape, dtype = packed.meta["shape"], packed.meta["dtype"]
        return (self._unpack_one(packed.tensors, "k", shape, dtype),
                self._unpack_one(packed.tensors, "v", shape, dtype))
