"""The propose -> verify -> commit contract shared by every drafter.

A drafter proposes a token tree hanging off the *root*, the last committed token (whose key/value is not yet in
the cache). The engine scores root + tree in one target forward pass, a verifier walks the tree and accepts a
path, the cache keeps exactly that path, and the drafter is told what happened (`observe`). Plain decoding is the
empty tree.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine
    from ..models.kv_cache import SeqKV
    from ..sampling import SamplingConfig


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
        rows = [1]  # each node's row as the bits of a Python int: one big-int OR a node, not one torch op a node
        for i, p in enumerate(self.parents, start=1):
            if not 0 <= p < i:
                raise ValueError(f"node {i}'s parent {p} must precede it")
            rows.append(rows[p] | 1 << i)
        size = (n + 7) // 8
        packed = np.frombuffer(b"".join(r.to_bytes(size, "little") for r in rows), dtype=np.uint8).reshape(n, size)
        return torch.from_numpy(np.unpackbits(packed, axis=1, count=n, bitorder="little").astype(bool))

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
    logits: torch.Tensor | None  # `[n+1, V]` target logits of root + every node (float32, before sampling rules);
    # None when the step's logits stayed on the device (greedy): drafters that learn from them set learns_from_steps
    hidden: torch.Tensor | None = None  # `[n+1, F]` the target's features (`Drafter.feature_layers`), rows as logits


class Drafter:
    """Base class: subclasses are dataclasses of their knobs; `engine` is attached by `bind` before use.

    The engine keeps one bound drafter per method and options (the *prototype*) and gives every sequence its own
    copy (`spawn`). The copy is shallow: what `bind` or `__post_init__` creates and the drafter mutates in place (a
    table, a trie, a matrix) is shared by every sequence of the engine, so the method keeps learning across
    generations; what `reset` assigns is the sequence's own.
    """

    name: ClassVar[str] = "plain"
    # True: the drafter learns from the target's logits in `observe`, so when it has nothing to draft the step runs
    # as one verified forward pass (whose logits it sees) instead of a fused greedy chunk (which it does not), and
    # the logits come to the host.
    learns_from_steps: ClassVar[bool] = False
    # How many of the last committed tokens `propose_on_device` reads (None: all of them, as n-gram lookup does).
    history_tokens: ClassVar[int | None] = None
    # Layers of the target whose hidden states the drafter reads (a draft head): the engine asks for them in every
    # pass of the sequence, prefill included (`prefill_features`), and hands them over in `StepResult.hidden`; index i
    # is block i's output, index num_layers the final normed state. Such a drafter never takes fused greedy chunks.
    feature_layers: ClassVar[tuple[int, ...]] = ()
    engine: "Engine | None" = None
    kv: "SeqKV | None" = None  # the target's KV memory of this drafter's sequence (self-speculation drafts there)
    sampling: "SamplingConfig | None" = None  # the sequence's sampling rule (stochastic drafters match it)
    recorder: Any = None  # the sequence's `engine.trace.StepTrace` when the request is traced (`trace=True`)

    def bind(self, engine: "Engine") -> "Drafter":
        self.engine = engine
        return self

    def spawn(self, kv: "SeqKV", sampling: "SamplingConfig", prompt_ids: list[int]) -> "Drafter":
        """This prototype's copy for one sequence, reset for its prompt."""
        drafter = copy.copy(self)
        drafter.kv, drafter.sampling = kv, sampling
        drafter.reset(prompt_ids)
        return drafter

    def reset(self, prompt_ids: list[int]) -> None:
        """Called once per sequence with the prompt, before the first `propose`."""

    def finish(self, tokens: list[int]) -> None:
        """Called when the sequence ends, with its prompt and output (drafters that learn from outputs keep them)."""

    def prefill_features(self, features: torch.Tensor) -> None:
        """The target's `feature_layers` states for a prefill chunk of the prompt, `[T, F]`, in order."""

    def propose(self, context: list[int]) -> DraftTree:
        """Draft after `context` (every committed token; its last one is the root). Empty tree = plain decoding."""
        return DraftTree()

    def propose_together(self, drafters: list["Drafter"], contexts: list[list[int]]) -> list[DraftTree]:
        """The proposals of every sequence of one method in a step (`self` is one of `drafters`, each a sequence's
        copy, `contexts` their committed tokens). By default each proposes alone; a drafter that runs a model
        overrides it to draft for all of them in one batched pass."""
        return [d.propose(c) for d, c in zip(drafters, contexts)]

    def observe(self, context: list[int], step: StepResult) -> None:
        """Called after each verified step; `context` already holds the newly committed tokens. Tokens decoded in
        fused greedy chunks (GPU) are not observed: the next `propose` sees them in `context`."""

    def max_draft_tokens(self) -> int:
        """Upper bound on a proposal's size (sizes the KV cache headroom)."""
        return 0

    @property
    def drafts_on_device(self) -> bool:
        """Whether greedy sequences may draft with `propose_on_device` inside fused draft rounds (several
        draft -> verify -> commit rounds per host synchronization, `speculative/device.py`)."""
        return False

    def propose_on_device(self, history: torch.Tensor, length: torch.Tensor, depth: int,
                          rounds: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A chain draft per row from `history` `[R, T]` (each row's committed tokens, its last one the root, at
        `[:length]`): `(draft [R, depth], n_draft [R])`, tokens past `n_draft` ignored. Tensor ops only, no host
        synchronization and static shapes: it runs inside a captured CUDA graph. `rounds`: the graph's
        `StaticDraftRounds`, whose passes a self-drafting method runs (`window_chain`). A drafter that reads only
        the tokens must propose what `propose` would from the same context (cut to `depth`)."""
        raise NotImplementedError(f"{self.name} does not draft on the device")

    def note_pass(self, model: str, width: int, kv: int, **extra: Any) -> None:
        """Record a forward pass the drafter ran (traced requests only): `model` "target" (self-drafting; `layers`
        of `of` when it runs fewer), "head" or "draft_model"; `width` tokens reading `kv` cached entries."""
        if self.recorder is not None:
            self.recorder.draft_pass(model, width, kv, **extra)


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
