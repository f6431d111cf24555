"""Draft-model speculative decoding (Leviathan et al. 2023; Chen et al. 2023) with a dynamic tree (DySpec, Xiong et
al. 2024; Sequoia, Chen et al. 2024) and an adaptive draft length (SpecDec++, Huang et al. 2024).

A smaller model with the target's tokenizer keeps its own KV cache, synchronized with the committed text by
rolling back to the common prefix and feeding only what it has not seen. It drafts greedily: a chain
(`tree_width=1`), or a tree grown level by level, best-first by cumulative draft probability, up to `max_nodes`.
Drafting stops early when the draft's path probability, its predictor of acceptance, falls under
`stop_threshold`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .base import DraftTree, Drafter, register


@register
@dataclass
class DraftModel(Drafter):
    """Knobs: `model` (a source for `decodekit.load`, an Engine or a model; "smollm2"), `num_draft` (max depth, 6),
    `tree_width` (children per node, 1 = chain), `max_nodes` (16, trees), `stop_threshold` (0.0 = off; SpecDec++)."""

    name = "draft"
    model: Any = "smollm2"
    num_draft: int = 6
    tree_width: int = 1
    max_nodes: int = 16
    stop_threshold: float = 0.0
    skip_layers: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        if self.num_draft < 1 or self.tree_width < 1 or self.max_nodes < 1:
            raise ValueError("draft: num_draft, tree_width and max_nodes must be >= 1")
        if not 0.0 <= self.stop_threshold < 1.0:
            raise ValueError(f"draft: stop_threshold must be in [0, 1), got {self.stop_threshold}")
        self.draft = None
        self.cache = None
        self.cached: list[int] = []  # the tokens whose keys and values are in self.cache

    def _draft_model(self):
        if isinstance(self.model, str):
            import decodekit

            return decodekit.load(self.model, device=self.engine.device, dtype=self.engine.model.dtype).model
        return getattr(self.model, "model", self.model)  # an Engine, or a model

    def bind(self, engine) -> "DraftModel":
        super().bind(engine)
        if self.draft is None:
            self.draft = self._draft_model()
            if self.draft.config.vocab_size != engine.model.config.vocab_size:
                raise ValueError(f"draft model vocabulary ({self.draft.config.vocab_size}) differs from the "
                                 f"target's ({engine.model.config.vocab_size})")
        return self

    def reset(self, prompt_ids: list[int]) -> None:
        size = self.engine.model.cache.max_len
        if self.cache is None or self.cache.max_len < size:
            self.cache = self.draft.make_cache(1, size)
        self.cache.reset()
        self.cached = []

    def _forward(self, tokens: list[int], depths: list[int] | None = None, tree_mask=None) -> torch.Tensor:
        dev = self.engine.device
        base = self.cache.length
        pos = torch.tensor(depths, device=dev) + base if depths is not None else torch.arange(len(tokens), device=dev) + base
        with torch.inference_mode():
            return self.draft(torch.tensor([tokens], device=dev), pos[None], tree_mask=tree_mask, cache=self.cache,
                              skip_layers=self.skip_layers)[0].float()

    def _sync(self, context: list[int]) -> torch.Tensor:
        """Bring the cache to `context` and return the draft's next-token distribution after it."""
        n = 0
        limit = min(len(self.cached), len(context) - 1)  # keep the last token out: its logits are needed
        while n < limit and self.cached[n] == context[n]:
            n += 1
        self.cache.rollback(n)
        logits = self._forward(context[n:])[-1]
        self.cached = list(context)
        return logits.softmax(-1)

    def propose(self, context: list[int]) -> DraftTree:
        probs = self._sync(context)
        if self.tree_width == 1:
            return self._chain(probs)
        return self._tree(probs)

    def _chain(self, probs: torch.Tensor) -> DraftTree:
        tokens, path_prob = [], 1.0
        for i in range(self.num_draft):
            p, tok = probs.max(-1)
            path_prob *= float(p)
            if tokens and path_prob < self.stop_threshold:
                break
            tokens.append(int(tok))
            if i + 1 < self.num_draft:
                probs = self._forward([tokens[-1]])[-1].softmax(-1)
                self.cached.append(tokens[-1])
        return DraftTree.chain(tokens)

    def _tree(self, root_probs: torch.Tensor) -> DraftTree:
        """Grow level by level; each level re-scores the whole tree so far in one tree-masked forward pass."""
        tree = DraftTree()
        path_prob = [1.0]
        frontier, frontier_probs = [0], root_probs[None]
        base = self.cache.length
        for _ in range(self.num_draft):
            candidates = []
            for node, probs in zip(frontier, frontier_probs):
                top_p, top_t = probs.topk(self.tree_width)
                candidates += [(path_prob[node] * float(p), node, int(t)) for p, t in zip(top_p, top_t)]
            candidates.sort(key=lambda c: -c[0])
            room = self.max_nodes - len(tree)
            chosen = [c for c in candidates if c[0] >= self.stop_threshold][:room]
            if not chosen:
                break
            frontier = []
            for prob, parent, tok in chosen:
                tree.tokens.append(tok)
                tree.parents.append(parent)
                path_prob.append(prob)
                frontier.append(len(tree))
            if len(tree) >= self.max_nodes:
                break
            self.cache.rollback(base)
            anc = tree.ancestor_mask()[1:, 1:].to(self.engine.device)
            logits = self._forward(tree.tokens, [d - 1 for d in tree.depths()[1:]], tree_mask=anc)
            frontier_probs = logits[[i - 1 for i in frontier]].softmax(-1)
        self.cache.rollback(base)
        return tree

    def max_draft_tokens(self) -> int:
        return self.num_draft if self.tree_width == 1 else self.max_nodes
