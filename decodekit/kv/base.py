"""The press contract: what the engine hands a press for one layer of one sequence, and what it gets back.

Layout follows NVIDIA kvpress: one press a file, a dataclass of knobs, the paper in the docstring. The base owns
the mechanism once (`ScorerPress` turns scores and a compression ratio into kept indices); a scorer only scores.

Conventions, per layer and per sequence (no batch dimension: a paged cache keeps one block table per sequence):
- keys, values `[H_kv, L, D]`: keys post-RoPE, as stored in the cache;
- positions `[L]`: the position of each token in its sequence (eviction preserves them: the kept tokens keep theirs);
- queries `[H_q, W, D]`: the post-RoPE queries of the last W tokens (SnapKV's observation window, EMS's local
  window); the last W keys belong to those same tokens; GQA: H_q = groups * H_kv;
- attn_mass `[H_kv, L]`: attention each key has received so far, summed over queries and the heads of its group
  (H2O; the engine keeps it with `h2o.accumulate_attention`).

`compression_ratio` R is the fraction REMOVED (kvpress convention): a press keeps
`n_keep = max(1, floor((1 - R) * L))` tokens (R = 0 keeps all L). Kept indices are sorted ascending.

Eviction presses choose the SAME tokens for every head of a layer (`select`): what a paged cache with one slot per
token can do. The per-token score is the mean of the per-head scores. `select_headwise` gives each head its own
top tokens (`[H_kv, n_keep]`), as head-wise methods (EMS) need; `reduce_headwise` turns that back into one set.
Quantization presses `pack` keys and values into a `PackedKV` (integers packed several to a byte) and `unpack` them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, ClassVar

import torch

# A score above every real score, used to protect tokens (sinks, recent windows) from eviction. Scores are ranked
# in float64, where PROTECTED + i stays exact for any cache length (2**40 + 2**20 < 2**53).
PROTECTED = 2.0**40


@dataclass
class LayerKV:
    """One layer of one sequence's cache, and the attention information a press may need."""

    keys: torch.Tensor  # [H_kv, L, D], post-RoPE
    values: torch.Tensor  # [H_kv, L, D]
    positions: torch.Tensor  # [L] long
    queries: torch.Tensor | None = None  # [H_q, W, D]: queries of the last W tokens (post-RoPE)
    attn_mass: torch.Tensor | None = None  # [H_kv, L]: accumulated attention received by each key
    prompt_len: int | None = None  # tokens at positions < prompt_len came from the prompt (SCOPE)

    def __post_init__(self) -> None:
        if self.keys.dim() != 3 or self.keys.shape != self.values.shape:
            raise ValueError(f"keys and values must both be [H_kv, L, D], got {tuple(self.keys.shape)} and "
                             f"{tuple(self.values.shape)}")
        h, n, d = self.keys.shape
        if self.positions.shape != (n,):
            raise ValueError(f"positions must be [L] = [{n}], got {tuple(self.positions.shape)}")
        if self.queries is not None and (self.queries.dim() != 3 or self.queries.shape[-1] != d
                                         or self.queries.shape[0] % h or self.queries.shape[1] > n):
            raise ValueError(f"queries must be [H_q, W, {d}] with H_q a multiple of {h} and W <= {n}, "
                             f"got {tuple(self.queries.shape)}")
        if self.attn_mass is not None and self.attn_mass.shape != (h, n):
            raise ValueError(f"attn_mass must be [H_kv, L] = [{h}, {n}], got {tuple(self.attn_mass.shape)}")

    @property
    def length(self) -> int:
        return self.keys.shape[1]

    def need(self, name: str, press: str) -> torch.Tensor:
        """The input `name`, or a one-line error saying which press needs it."""
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"the {press} press needs {name} (see decodekit/kv/base.py for its shape)")
        return value

    def gather(self, indices: torch.Tensor) -> "LayerKV":
        """The tokens at `indices` (`[n]`, sorted, one set for every head), each with its own position and mass.

        The observation-window queries stay only while they are still the queries of the last W tokens (the window
        was kept whole, at the end); otherwise they no longer describe this cache and are dropped.
        """
        queries = self.queries
        if queries is not None:
            w, n = queries.shape[1], self.length
            tail = torch.arange(n - w, n, device=indices.device)
            if indices.numel() < w or not torch.equal(indices[indices.numel() - w:], tail):
                queries = None
        return replace(self, keys=self.keys[:, indices], values=self.values[:, indices], queries=queries,
                       positions=self.positions[indices],
                       attn_mass=None if self.attn_mass is None else self.attn_mass[:, indices])


def kept_count(length: int, compression_ratio: float) -> int:
    """`max(1, floor((1 - R) * L))`; the epsilon keeps float error (0.7 * 10 = 6.999...) off the floor."""
    return min(length, max(1, math.floor((1.0 - compression_ratio) * length + 1e-9)))


def check_ratio(compression_ratio: float) -> None:
    if not 0.0 <= compression_ratio < 1.0:
        raise ValueError(f"compression_ratio is the fraction removed and must be in [0, 1), got {compression_ratio}")


def protect_last(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Scores (float64) with the last `n` tokens above every other token, the most recent highest."""
    scores = scores.double().clone()
    if n <= 0:
        return scores
    length = scores.shape[-1]
    n = min(n, length)
    scores[..., length - n:] = PROTECTED + torch.arange(n, dtype=scores.dtype, device=scores.device)
    return scores


class Press:
    """Base of every press; subclasses are dataclasses of their knobs with a `name` for the registry."""

    name: ClassVar[str] = ""


@dataclass
class ScorerPress(Press):
    """Evicts the tokens with the lowest scores; a subclass only implements `score`."""

    compression_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_ratio(self.compression_ratio)

    def score(self, kv: LayerKV, n_keep: int) -> torch.Tensor:
        """`[H_kv, L]`: higher = more worth keeping. `n_keep` lets a scorer size protected windows."""
        raise NotImplementedError

    def n_keep(self, length: int) -> int:
        return kept_count(length, self.compression_ratio)

    def select(self, kv: LayerKV, n_keep: int | None = None) -> torch.Tensor:
        """Sorted indices `[n_keep]` of the tokens every head keeps (top mean score over heads)."""
        n_keep = self.n_keep(kv.length) if n_keep is None else min(n_keep, kv.length)
        if n_keep >= kv.length:  # nothing to evict: no scores needed (and no attention inputs)
            return torch.arange(kv.length, device=kv.keys.device)
        scores = self.score(kv, n_keep).double().mean(dim=0)
        return scores.topk(n_keep).indices.sort().values

    def select_headwise(self, kv: LayerKV, n_keep: int | None = None) -> torch.Tensor:
        """Sorted indices `[H_kv, n_keep]`: each head keeps its own top tokens."""
        n_keep = self.n_keep(kv.length) if n_keep is None else min(n_keep, kv.length)
        if n_keep >= kv.length:
            return torch.arange(kv.length, device=kv.keys.device).expand(kv.keys.shape[0], -1)
        return self.score(kv, n_keep).double().topk(n_keep, dim=-1).indices.sort(dim=-1).values

    def compress(self, kv: LayerKV) -> LayerKV:
        return kv.gather(self.select(kv))


def reduce_headwise(indices: torch.Tensor, scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """One token set `[n_keep]` (sorted) from head-wise choices `[H_kv, k]` for a cache with one slot per token.

    A token's rank is the number of heads that keep it, ties broken by its summed score over heads (`[H_kv, L]`).
    """
    votes = torch.zeros(scores.shape, dtype=torch.float64, device=scores.device)
    votes.scatter_(1, indices, 1.0)
    # Scores in [0, 1) after a min-max squeeze only break ties between equal vote counts.
    total = scores.double().sum(dim=0)
    tie = (total - total.min()) / ((total.max() - total.min()) * (1 + 1e-6) + 1e-300)
    rank = votes.sum(dim=0) + tie
    return rank.topk(min(n_keep, rank.numel())).indices.sort().values


@dataclass
class PackedKV:
    """Quantized keys and values as held in memory: every tensor here counts towards `nbytes`.

    `meta` holds plain Python facts (shapes, dtypes, bit widths) that cost nothing per token.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class QuantPress(Press):
    """Quantization presses: `pack(keys, values) -> PackedKV`, `unpack(packed) -> (keys, values)`."""

    def pack(self, keys: torch.Tensor, values: torch.Tensor) -> PackedKV:
        raise NotImplementedError

    def unpack(self, packed: PackedKV) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


PRESSES: dict[str, Callable[..., Press]] = {}


def register(cls: type) -> type:
    """Class decorator: make a press available by its `name` to `make_press`."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a name to be registered")
    PRESSES[cls.name] = cls
    return cls


def make_press(name: str, **knobs: Any) -> Press:
    """The press registered as `name`, built with `knobs` (one-line errors for unknown names or knobs)."""
    if name not in PRESSES:
        raise ValueError(f"unknown press {name!r}; available: {', '.join(sorted(PRESSES))}")
    cls = PRESSES[name]
    known = {f.name for f in fields(cls)} if hasattr(cls, "__dataclass_fields__") else set()
    unknown = sorted(set(knobs) - known)
    if unknown:
        raise ValueError(f"press {name!r} has no knob {unknown[0]!r}; knobs: {', '.join(sorted(known))}")
    return cls(**knobs)
