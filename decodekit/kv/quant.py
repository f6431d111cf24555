"""Quantization arithmetic the quantization presses share: bit packing, grouped uniform quantization, Hadamard
matrices, non-uniform levels (1-D k-means), sparse outliers.

Scales and zero points are stored in float16 (2 bytes each) whatever the cache dtype; integer codes are packed
8 // bits to a uint8 (2-bit: 4 codes a byte, 4-bit: 2 a byte).
"""
from __future__ import annotations

import math

import torch

SCALE_DTYPE = torch.float16


def check_bits(bits: int, allowed: tuple[int, ...] = (2, 4)) -> None:
    if bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits}")


def check_kv(keys: torch.Tensor, values: torch.Tensor) -> None:
    if keys.dim() != 3 or keys.shape != values.shape:
        raise ValueError(f"keys and values must both be [H_kv, L, D], got {tuple(keys.shape)}, {tuple(values.shape)}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes `[..., N]` (each < 2**bits) -> `[..., ceil(N * bits / 8)]` bytes, first code in the low bits."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    c = torch.nn.functional.pad(codes, (0, pad)).to(torch.uint8).reshape(*codes.shape[:-1], (n + pad) // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=codes.device)
    return (c << shifts).sum(dim=-1, dtype=torch.uint8)  # disjoint bit fields: the sum is an OR


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: `[..., n]` uint8 codes."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.flatten(-2)[..., :n]


def _grouped(x: torch.Tensor, dim: int, group: int) -> torch.Tensor:
    """`x` with `dim` moved last and split into `[..., n // group, group]`."""
    x = x.movedim(dim, -1)
    if x.shape[-1] % group:
        raise ValueError(f"a dimension of size {x.shape[-1]} does not split into groups of {group}")
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group)


def _ungrouped(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x.flatten(-2).movedim(-1, dim)


def quantize(x: torch.Tensor, bits: int, dim: int, group: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric uniform quantization in groups of `group` consecutive elements along `dim`.

    Returns uint8 codes (x's shape), and the float16 scale and zero point (the group minimum) of each group, shaped
    `[..., n_groups]` with `dim` moved last. The codes are computed from the float16-rounded scale and zero, so
    `dequantize` is within half a step of x (up to float16 rounding at the group maximum).
    """
    g = _grouped(x.float(), dim, group)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    top = (1 << bits) - 1
    scale = ((hi - lo) / top).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    step = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    codes = ((g - zero.float()[..., None]) / step).round().clamp(0, top).to(torch.uint8)
    return _ungrouped(codes, dim), scale, zero


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dim: int, group: int,
               dtype: torch.dtype) -> torch.Tensor:
    g = _grouped(codes.float(), dim, group)
    return _ungrouped(g * scale.float()[..., None] + zero.float()[..., None], dim).to(dtype)


def hadamard(n: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix of size n (a power of two), Sylvester's construction, float32."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], dim=1), torch.cat([h, -h], dim=1)])
    return h / math.sqrt(n)


def kmeans_1d(x: torch.Tensor, k: int, weights: torch.Tensor | None = None, iters: int = 50) -> torch.Tensor:
    """Sorted centres `[k]` of (weighted) Lloyd's k-means on scalars, started at the quantiles of x."""
    x = x.flatten().double()
    w = torch.ones_like(x) if weights is None else weights.flatten().double()
    if x.numel() < k:
        raise ValueError(f"k-means needs at least {k} calibration values, got {x.numel()}")
    centres = torch.quantile(x, torch.linspace(0, 1, k + 2, dtype=torch.float64, device=x.device)[1:-1])
    for _ in range(iters):
        assign = nearest_level(x, centres)
        mass = torch.zeros(k, dtype=torch.float64, device=x.device).scatter_add_(0, assign, w)
        total = torch.zeros(k, dtype=torch.float64, device=x.device).scatter_add_(0, assign, w * x)
        centres = torch.where(mass > 0, total / mass.clamp_min(1e-300), centres).sort().values  # empty: stay
    return centres


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index (long) of the nearest of the sorted `levels` to each element of x."""
    mid = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.to(levels.dtype), mid)


def split_outliers(x: torch.Tensor, outlier: torch.Tensor, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """x with the `outlier` elements zeroed, and those elements as a sparse list (int32 flat index, value)."""
    flat = outlier.flatten().nonzero()[:, 0]
    sparse = {"index": flat.to(torch.int32), "value": x.flatten()[flat].to(dtype)}
    return x.masked_fill(outlier, 0), sparse


def add_outliers(x: torch.Tensor, sparse: dict[str, torch.Tensor]) -> torch.Tensor:
    """x with the sparse outliers written back at their places."""
    out = x.flatten().clone()
    out[sparse["index"].long()] = sparse["value"].to(out.dtype)
    return out.reshape(x.shape)
