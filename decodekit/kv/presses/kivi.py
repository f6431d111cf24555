"""KIVI: 2/4-bit asymmetric quantization, keys per channel and values per token, a full-precision recent window.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024, arXiv 2402.02750). Key
caches have outlier channels, so keys are quantized per channel, in groups of `group` consecutive tokens; values
are quantized per token, in groups of `group` consecutive channels. The most recent tokens stay in full precision:
the quantized part is the longest prefix made of whole key groups that leaves at least `residual` tokens
unquantized (between `residual` and `residual + group - 1` recent tokens, or all of them in a short cache).

Bytes held (`nbytes`): the packed codes (bits/8 per element), a float16 scale and zero point per group (4/group
bytes per element, for keys and for values), and the full-precision window at the cache dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..base import PackedKV, QuantPress, register
from ..quant import check_bits, check_kv, dequantize, pack_bits, quantize, unpack_bits


@register
@dataclass
class KIVIPress(QuantPress):
    name = "kivi"
    heads_apart = True  # each head is packed on its own: heads of several layers may be packed as one
    bits: int = 2
    group: int = 32  # group size: tokens per key group, channels per value group (capped at head_dim)
    residual: int = 128  # recent tokens kept in full precision (at least)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.group < 1 or self.residual < 0:
            raise ValueError(f"group must be >= 1 and residual >= 0, got {self.group} and {self.residual}")

    def quantized_length(self, length: int) -> int:
        return max(0, (length - self.residual) // self.group * self.group)

    def pack(self, keys: torch.Tensor, values: torch.Tensor) -> PackedKV:
        check_kv(keys, values)
        h, n, d = keys.shape
        nq, gv = self.quantized_length(n), min(self.group, d)
        kc, ks, kz = quantize(keys[:, :nq], self.bits, dim=1, group=self.group)  # per channel
        vc, vs, vz = quantize(values[:, :nq], self.bits, dim=2, group=gv)  # per token
        tensors = {"k_codes": pack_bits(kc, self.bits), "k_scale": ks, "k_zero": kz,
                   "v_codes": pack_bits(vc, self.bits), "v_scale": vs, "v_zero": vz,
                   "k_recent": keys[:, nq:].clone(), "v_recent": values[:, nq:].clone()}
        return PackedKV(tensors, {"shape": (h, n, d), "dtype": keys.dtype, "quantized": nq, "value_group": gv})

    def concat(self, packs: list[PackedKV]) -> PackedKV:
        """One pack holding consecutive packs without a recent window (the engine's chunks), byte for byte: fewer,
        larger reads when attention dequantizes them every step."""
        if any(p.meta["quantized"] != p.meta["shape"][1] for p in packs):
            raise ValueError("only packs without full-precision recent tokens concatenate")
        along = {"k_scale": 2, "k_zero": 2}  # per-channel key groups: [H, D, n / group]; the rest [H, n, ...]
        tensors = {name: torch.cat([p.tensors[name] for p in packs], dim=along.get(name, 1))
                   for name in packs[0].tensors}
        h, _, d = packs[0].meta["shape"]
        n = sum(p.meta["shape"][1] for p in packs)
        return PackedKV(tensors, {**packs[0].meta, "shape": (h, n, d), "quantized": n})

    def unpack(self, packed: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
        t, m = packed.tensors, packed.meta
        d, dtype = m["shape"][2], m["dtype"]
        k = dequantize(unpack_bits(t["k_codes"], self.bits, d), t["k_scale"], t["k_zero"], 1, self.group, dtype)
        v = dequantize(unpack_bits(t["v_codes"], self.bits, d), t["v_scale"], t["v_zero"], 2, m["value_group"], dtype)
        return torch.cat([k, t["k_recent"]], dim=1), torch.cat([v, t["v_recent"]], dim=1)
