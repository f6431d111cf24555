"""The propose -> verify -> commit contract shared by every drafter.

A drafter proposes a token tree hanging off the *root*, the last committed token (whose key/value is not yet in
the cache). The engine scores root + tree in one target forward pass, a verifier walks the tree and accepts a
path, the cache keeps exactly that path, and the drafter is told what happened (`observe`). Plain decoding is the
empty tree.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine


@dataclass
class DraftTree:
    """Proposed tokens as a tree; node i (1-based: index 0 is the root) has parent `parents[i-1]` (0 = root).

    Children are verified in the order they appear. A chain is the tree where node i's parent is i-1.
    `draft_probs[i-1]` is the distribution node i was sampled from (given its parent), needed for lossless
    speculative sampling with a stochastic drafter; None means the tokens were chosen deterministically.
    Nodes with `verify[i-1] == False` ride along in the forward pass for the drafter's own use (lookahead's
    Jacobi window): the verifier never accepts them.
    """

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    draft_probs: torch.Tensor | None = None
    verify: list[bool] | None = None
    # Draft probabilities are sampled without replacement among siblings (RSD); decides the residual update.
    without_replacement: bool = False

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def chain(cls, tokens: list[int], draft_probs: torch.Tensor | None = None) -> "DraftTree":
        return cls(list(tokens), list(range(len(tokens))), draft_probs)

    def is_chain(self) -> bool:
        return all(p == i for i, p in enumerate(self.parents)) and (self.verify is None or all(self.verify))

    def depths(self) -> list[int]:
        depth = [0]
        for p in self.parents:
            depth.append(depth[p] + 1)
        return depth

    def ancestor_mask(self) -> torch.Tensor:
        """`[n+1, n+1]` bool, root included: entry (i, j) is true when j is i or an ancestor of i."""
        n = len(self.tokens) + 1
        anc = torch.eye(n, dtype=torch.bool)
        for i, p in enumerate(self.parents, start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i}'s parent {p} must precede it")
            anc[i] |= anc[p]
        return anc

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents, start=1):
            if self.verify is None or self.verify[i - 1]:
                kids[p].append(i)
        return kids


@dataclass
class StepResult:
    """What one verify step did, for drafters that learn from the target (recycling, lookahead, layerskip...)."""

    tree: DraftTree
    accepted: list[int]  # accepted node indices (1-based), in path order
    next_token: int  # the target's token after the accepted path
    logits: torch.Tensor  # `[n+1, V]` target logits of root + every node (float32, before sampling rules)
    hidden: torch.Tensor | None = None  # `[n+1, F]` the target's features (`Drafter.feature_layers`), rows as logits


class Drafter:
    """Base class: subclasses are dataclasses of their knobs; `engine` is attached by `bind` before use."""

    name: ClassVar[str] = "plain"
    # True: the drafter learns from the target's logits in `observe`, so when it has nothing to draft the step runs
    # as one verified forward pass (whose logits it sees) instead of a fused greedy chunk (which it does not).
    learns_from_steps: ClassVar[bool] = False
    # Layers of the target whose hidden states the drafter reads (trained heads), in `Transformer.forward`'s
    # `hidden_layers` convention. Non-empty: the engine passes the prompt's features to `prefill_features` and each
    # verify step's to `observe` (`StepResult.hidden`), and never decodes in fused chunks (their features are lost).
    feature_layers: tuple[int, ...] = ()
    engine: "Engine | None" = None

    def bind(self, engine: "Engine") -> "Drafter":
        self.engine = engine
        return self

    def reset(self, prompt_ids: list[int]) -> None:
        """Called once per generation with the prompt, before the first `propose`."""

    def prefill_features(self, features: torch.Tensor) -> None:
        """Called after `reset` when `feature_layers` is set: `[P, F]` features of every prompt position."""

    def propose(self, context: list[int]) -> DraftTree:
        """Draft after `context` (every committed token; its last one is the root). Empty tree = plain decoding."""
        return DraftTree()

    def observe(self, context: list[int], step: StepResult) -> None:
        """Called after each verified step; `context` already holds the newly committed tokens. Tokens decoded in
        fused greedy chunks (GPU) are not observed: the next `propose` sees them in `context`."""

    def max_draft_tokens(self) -> int:
        """Upper bound on a proposal's size (sizes the KV cache headroom)."""
        return 0


DRAFTERS: dict[str, Callable[..., Drafter]] = {"plain": Drafter}


def register(cls: type[Drafter]) -> type[Drafter]:
    """Class decorator: make a drafter available by its `name` to `generate(method=...)` and the CLI."""
    DRAFTERS[cls.name] = cls
    return cls


def make_drafter(method: str | Drafter, options: dict[str, Any]) -> Drafter:
    if isinstance(method, Drafter):
        return method
    if method not in DRAFTERS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(DRAFTERS))}")
    try:
        return DRAFTERS[method](**options)
    except TypeError as e:
        raise ValueError(f"bad option for method {method!r}: {e}") from None
