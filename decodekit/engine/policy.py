"""Policies: strategies that decide for all of a request's sequences at once (search/: beams, contrastive, ...).

The step treats a request with a `policy` differently in one place only: after the pass, instead of each sequence
sampling and verifying on its own, the policy gets every sequence's rows (the root's logits, then those of the
candidates it asked to score in `plan`, and the hidden states of its `feature_layers`) and commits, forks
(`EngineCore.fork_sequence`: the KV memory is shared) or finishes sequences itself. A policy may also pause a
sequence (`seq.paused = True`: it keeps its KV memory and takes no part in passes until resumed), e.g. a hypothesis
waiting in a best-first queue. Everything else (scheduling, the batched pass, KV memory, stop rules) is the same loop.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..speculative.base import DraftTree

if TYPE_CHECKING:  # pragma: no cover
    from .core import EngineCore, Request
    from .sequence import Sequence

Rows = "dict[Sequence, tuple[torch.Tensor, torch.Tensor | None]]"


class Policy:
    feature_layers: tuple[int, ...] = ()  # hidden states the policy reads (index num_layers: the final norm)
    max_nodes: int = 0  # the most candidates `plan` puts under a root (KV room is reserved for them)

    def plan(self, seq: "Sequence") -> DraftTree:
        """Tokens to score beside `seq`'s root in the next pass (a tree under the root); none by default."""
        return DraftTree()

    def step(self, core: "EngineCore", req: "Request", rows: Rows) -> list["Sequence"]:
        """Decide after a pass: `rows[seq]` = (logits `[w, V]`, hidden `[w, F]` or None) for the root and the planned
        nodes of each of the request's sequences that took part (a sequence that just finished its prompt: the
        prompt's last logits). Its KV memory holds the pass's `w` entries at its end (`kv.keep_path` keeps some).
        Returns the sequences that changed."""
        raise NotImplementedError

    def finished(self, req: "Request") -> bool:
        return all(s.finished for s in req.sequences)

    def prefill_features(self, seq: "Sequence", features: torch.Tensor) -> None:
        """The `feature_layers` states of a prefill chunk of `seq`'s prompt, `[T, F]`, in order (contrastive search
        compares candidates with every earlier token, the prompt's included)."""


def keep(seq: "Sequence", width: int, nodes: list[int], tokens: list[int]) -> list[int]:
    """Keep the planned nodes `nodes` (1-based, in path order) of the last pass's `width` entries, then commit
    `tokens` (the nodes' tokens and what follows them) through the stop rules; returns what was committed.
    `width` 0: the rows were the prompt's last logits, whose entries are all kept already (no root was written)."""
    if width:
        seq.kv.keep_path(seq.kv.length - width, [0, *nodes])
    elif nodes:
        raise ValueError("a prefill's rows have no planned nodes to keep")
    return seq.commit(tokens)
