"""KVQuant: pre-RoPE per-channel keys, per-token values, non-uniform levels, dense-and-sparse outliers.

Hooper et al., "KVQuant: Towards 10 Million Context Length LLM Inference with KV Cache Quantization" (NeurIPS 2024,
arXiv 2401.18079). What is implemented, per layer:
- Keys are quantized BEFORE the rotary embedding (RoPE mixes channel pairs and smears the per-channel outlier
  structure): give `rope=(cos, sin)`, each `[L, D]` at the tokens' positions (for the native model:
  `model.rope_global[0][positions]`, `model.rope_global[1][positions]`; `rope_local` on Gemma's sliding layers),
  and the press un-rotates on `pack` and re-rotates on `unpack`; without `rope` the keys are taken as pre-RoPE.
- Keys per channel: each (head, channel) has a range fixed offline by `calibrate` (the `outlier_fraction / 2`
  quantiles at each end); values per token: each token's range is its own, computed online, leaving out its
  `floor(outlier_fraction * D / 2)` smallest and largest entries.
- Dense-and-sparse: entries outside their range are outliers, kept exactly (at the cache dtype) in a sparse list
  (int32 flat index + value); the rest is normalised to [-1, 1] and mapped to the nearest of 2**bits levels.
- Non-uniform levels ("nuq"): one codebook for keys and one for values per layer, fitted by `calibrate` with
  weighted 1-D k-means on normalised calibration data. The paper weights by Fisher information (squared gradients);
  pass those as `key_weights` / `value_weights`, or leave them None for unweighted k-means.
Not implemented: the paper's per-vector dense-and-sparse for keys at runtime (ranges here are calibrated) and its
full-precision attention-sink token.

Bytes held (`nbytes`): packed codes (bits/8 per element), per-channel key ranges (2 float16 per head and channel),
per-token value ranges (2 float16 per head and token), the two codebooks (float16), and 4 + dtype bytes per outlier.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...models.transformer import apply_rope
from ..base import PackedKV, QuantPress, register
from ..quant import (SCALE_DTYPE, add_outliers, check_bits, check_kv, kmeans_1d, nearest_level, pack_bits,
                     split_outliers, unpack_bits)

Rope = tuple[torch.Tensor, torch.Tensor]


def unrotate(keys: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Pre-RoPE keys from post-RoPE ones: the inverse rotation is the rotation by -angle (sin -> -sin)."""
    cos, sin = rope
    return apply_rope(keys.float(), cos.float(), -sin.float())


def rotate(keys: torch.Tensor, rope: Rope) -> torch.Tensor:
    cos, sin = rope
    return apply_rope(keys.float(), cos.float(), sin.float())


def token_ranges(values: torch.Tensor, outlier_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token range `[H, L]` low and high, leaving out the `floor(f * D / 2)` extreme entries at each end."""
    d = values.shape[-1]
    n_side = int(outlier_fraction * d / 2)
    s = values.float().sort(dim=-1).values
    return s[..., n_side], s[..., d - 1 - n_side]


def centre_halfwidth(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 centre and half-width of a range (a zero width becomes 1: any level then reproduces the centre)."""
    half = ((hi - lo) / 2).to(SCALE_DTYPE)
    return ((hi + lo) / 2).to(SCALE_DTYPE), torch.where(half > 0, half, torch.ones_like(half))


@register
@dataclass
class KVQuantPress(QuantPress):
    name = "kvquant"
    bits: int = 4
    outlier_fraction: float = 0.01  # share of entries kept exactly as sparse outliers
    kmeans_iters: int = 50
    # Set by `calibrate`:
    key_lo: torch.Tensor | None = field(default=None, repr=False)  # [H, D] per-channel ranges, pre-RoPE
    key_hi: torch.Tensor | None = field(default=None, repr=False)
    key_levels: torch.Tensor | None = field(default=None, repr=False)  # [2**bits] in [-1, 1]
    value_levels: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if not 0.0 <= self.outlier_fraction < 1.0:
            raise ValueError(f"outlier_fraction must be in [0, 1), got {self.outlier_fraction}")

    def calibrate(self, keys: torch.Tensor, values: torch.Tensor, rope: Rope | None = None,
                  key_weights: torch.Tensor | None = None, value_weights: torch.Tensor | None = None
                  ) -> "KVQuantPress":
        """Fit the key ranges and both codebooks on calibration keys/values `[H, L, D]` of this layer."""
        k = (unrotate(keys, rope) if rope is not None else keys).float()
        q = torch.tensor([self.outlier_fraction / 2, 1 - self.outlier_fraction / 2], device=k.device)
        ranges = torch.quantile(k.transpose(1, 2), q, dim=-1)  # [2, H, D]
        self.key_lo, self.key_hi = ranges[0].to(SCALE_DTYPE), ranges[1].to(SCALE_DTYPE)
        kn, k_in = self._normalise_keys(k)
        vn, v_in = self._normalise_values(values.float())
        n = 1 << self.bits
        kw = None if key_weights is None else key_weights[k_in]
        vw = None if value_weights is None else value_weights[v_in]
        self.key_levels = kmeans_1d(kn[k_in], n, kw, self.kmeans_iters).clamp(-1, 1).to(SCALE_DTYPE)
        self.value_levels = kmeans_1d(vn[v_in], n, vw, self.kmeans_iters).clamp(-1, 1).to(SCALE_DTYPE)
        return self

    def _normalise_keys(self, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys mapped by their channel's range to [-1, 1], and the inlier mask."""
        inlier = (k >= self.key_lo.float()[:, None]) & (k <= self.key_hi.float()[:, None])
        mid, half = centre_halfwidth(self.key_lo.float(), self.key_hi.float())
        return (k - mid.float()[:, None]) / half.float()[:, None], inlier

    def _normalise_values(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = token_ranges(v, self.outlier_fraction)
        inlier = (v >= lo[..., None]) & (v <= hi[..., None])
        mid, half = centre_halfwidth(lo, hi)
        return (v - mid.float()[..., None]) / half.float()[..., None], inlier

    def pack(self, keys: torch.Tensor, values: torch.Tensor, rope: Rope | None = None) -> PackedKV:
        if self.key_levels is None:
            raise ValueError("the kvquant press needs calibrate(keys, values) before pack")
        check_kv(keys, values)
        if (keys.shape[0], keys.shape[2]) != tuple(self.key_lo.shape):
            raise ValueError(f"keys {tuple(keys.shape)} do not match the calibration's [H_kv, D] = "
                             f"{tuple(self.key_lo.shape)}")
        k = (unrotate(keys, rope) if rope is not None else keys).float()
        v = values.float()
        kn, k_in = self._normalise_keys(k)
        vn, v_in = self._normalise_values(v)
        v_mid, v_half = centre_halfwidth(*token_ranges(v, self.outlier_fraction))
        _, k_out = split_outliers(k, ~k_in, keys.dtype)
        _, v_out = split_outliers(v, ~v_in, values.dtype)
        d = keys.shape[-1]
        tensors = {
            "k_codes": pack_bits(nearest_level(kn, self.key_levels.float()).to(torch.uint8), self.bits),
            "v_codes": pack_bits(nearest_level(vn, self.value_levels.float()).to(torch.uint8), self.bits),
            "k_lo": self.key_lo, "k_hi": self.key_hi, "v_mid": v_mid, "v_half": v_half,
            "k_levels": self.key_levels, "v_levels": self.value_levels,
            "k_out_index": k_out["index"], "k_out_value": k_out["value"],
            "v_out_index": v_out["index"], "v_out_value": v_out["value"],
        }
        return PackedKV(tensors, {"shape": tuple(keys.shape), "dtype": keys.dtype, "head_dim": d})

    def unpack(self, packed: PackedKV, rope: Rope | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        t, m = packed.tensors, packed.meta
        d, dtype = m["head_dim"], m["dtype"]
        k_mid, k_half = centre_halfwidth(t["k_lo"].float(), t["k_hi"].float())
        kn = t["k_levels"].float()[unpack_bits(t["k_codes"], self.bits, d).long()]
        vn = t["v_levels"].float()[unpack_bits(t["v_codes"], self.bits, d).long()]
        k = kn * k_half.float()[:, None] + k_mid.float()[:, None]
        v = vn * t["v_half"].float()[..., None] + t["v_mid"].float()[..., None]
        k = add_outliers(k, {"index": t["k_out_index"], "value": t["k_out_value"]})
        v = add_outliers(v, {"index": t["v_out_index"], "value": t["v_out_value"]})
        if rope is not None:
            k = rotate(k, rope)
        return k.to(dtype), v.to(dtype)
