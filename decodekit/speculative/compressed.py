"""Long-context self-speculation: the target drafts for itself over a compressed copy of the sequence's KV cache,
and verifies with the full cache (lossless by construction: the verify pass never sees the compressed copy).

For a long context a decode step's cost is reading the KV cache; a draft that reads a small cache is cheap while
drafting the same model's tokens, so it is accepted often (TriForce, Sun et al. 2024; MagicDec, Chen et al. 2024;
QuantSpec, Tiwari et al. 2025). This base holds what they share; each drafter file only says which press builds
the draft's cache (`_state`).

The draft cache is a `SeqKV` of its own (`ModelDrafter` with `share_cache=False`), in the target's pool, with a
`kv.paged` press state on it, the same code that presses a sequence's cache in the engine. At the first proposal
the target's keys and values of the context are copied into it (no second prefill), except the last
`window` tokens, which are fed again so that the press sees their queries (SnapKV's observation window); then the
press acts (evicts to its budget, or packs the old blocks). Each later proposal feeds the newly committed tokens
(accepted drafts and the target's bonus token), lets the press act again (a sliding budget, new packed blocks),
drafts a greedy chain from the root, and rolls the draft tokens back. Where the runner offers fused greedy chunks
(CUDA graphs on a GPU) and the press needs no part in the passes (eviction), the chain is one fused chunk of
`num_draft` steps over the small cache, replayed as a captured graph; otherwise (quantized caches, the CPU) the
draft runs eagerly, one `forward_seq` a token.
"""
from __future__ import annotations

import torch

from ..kv.paged import PressState
from ..models.batch import RowSpec
from ..models.kv_cache import PoolFull, SeqKV
from .base import DraftTree
from .draft_model import ModelDrafter, native_model


class CompressedDrafter(ModelDrafter):
    """Subclasses (dataclasses) define `num_draft`, `stop_threshold` and `_state(prompt_len)`."""

    def _setup(self) -> None:
        self.net = None
        self.cache = None
        self.pool_holder: list = []
        self.skip = frozenset()
        self.draw = None  # greedy drafts: deterministic, lossless under every verifier
        if self.num_draft < 1:
            raise ValueError(f"{self.name}: num_draft must be >= 1, got {self.num_draft}")
        if not 0.0 <= self.stop_threshold < 1.0:
            raise ValueError(f"{self.name}: stop_threshold must be in [0, 1), got {self.stop_threshold}")

    def _state(self, prompt_len: int) -> PressState:
        raise NotImplementedError

    def bind(self, engine) -> "CompressedDrafter":
        if getattr(engine.model, "world", 1) > 1:  # its press reads and compacts one rank's pool only
            raise ValueError(f"{self.name} does not run under tensor parallelism yet")
        super().bind(engine)
        self.net = native_model(engine.model)
        return self

    def reset(self, prompt_ids: list[int]) -> None:
        self._open_cache(shared=False)
        # The draft cache lives in the target's pool: the runner's fused greedy chunks (CUDA graphs) can draft there.
        self.cache = SeqKV(self.kv.pool)
        self.state: PressState | None = None
        self.fed = 0  # context tokens whose keys and values the draft cache has taken in (held or evicted)
        self.drafted: list[int] = []  # drafts whose entries follow the `fed` tokens' (kept if the target accepts them)

    def finish(self, tokens: list[int]) -> None:
        self._drop()

    def _observer(self, positions: list[int]):
        return self.state.observer(self.cache, positions, False) if self.state is not None else None

    def _start(self, context: list[int]) -> None:
        """Build the draft cache from the target's: copy the context's keys and values, feed the window again, press."""
        root = len(context) - 1
        self.state = self._state(root)
        window = min(getattr(self.state, "window", 0), root)
        target, cache = self.kv, self.cache
        cache.free()
        split = root - window
        # The target's memory cannot be read here (packed, evicted, or its rings gave entries back): prefill anew.
        if target.virtual or target.ring_released or target.written != root:
            split = 0
        else:
            slots = target.slot_tensor()
            n = int((target.pool.slot_pos[slots] < split).sum())  # entries are in position order
            cache.append_from(target, list(range(n)))  # the full pool's entries, and the rings' windows
            cache.evicted = split - n  # tokens the target itself had evicted
        chunk = 2048  # tokens a catch-up pass feeds (the engine's default prefill budget)
        for s in range(split, root, chunk):
            part = list(range(s, min(s + chunk, root)))
            layers = self.net.config.num_layers
            self.note_pass("target", len(part), cache.length, layers=layers, of=layers, logits=0)
            with torch.inference_mode():
                self.net.forward_seq(cache, [context[i] for i in part], part, None, "none",
                                     observer=self.state.observer(cache, part, True))
        self.fed = root

    def propose(self, context: list[int]) -> DraftTree:
        return self.propose_together([self], [context])[0]

    def propose_together(self, drafters: list["CompressedDrafter"], contexts: list[list[int]]) -> list[DraftTree]:
        """Every sequence's draft: where the runner offers fused greedy chunks and the press takes no part in the
        passes, all draft caches take their new tokens in one pass and draft in one fused chunk (at a large batch
        and a long context a target step reads B full caches, a draft step B small ones: MagicDec's regime);
        otherwise each drafts eagerly, alone."""
        runner = self.engine.core.runner
        trees: list[DraftTree | None] = [None] * len(drafters)
        fused = []
        for i, (d, context) in enumerate(zip(drafters, contexts)):
            try:
                d._prepare(context)
                if runner.fused_sizes and not d.state.observed(d.cache):
                    fused.append(i)
                    continue
                trees[i] = ModelDrafter.propose(d, context)
                if d.cache.length == 0:  # the pool ran dry while drafting (`propose` emptied the cache): start over
                    d.state = None
            except PoolFull:
                d._drop()
                trees[i] = DraftTree()
        if fused:
            for i, tree in zip(fused, self._fused([drafters[i] for i in fused], [contexts[i] for i in fused], runner)):
                trees[i] = tree
        return trees

    def _prepare(self, context: list[int]) -> None:
        """Before drafting: build the draft cache (first proposal), or keep the entries of last step's drafts that the
        target accepted and forget the rest; then let the press act."""
        if self.state is None or self.fed > len(context) - 1:
            self._start(context)
        elif self.drafted:
            committed = context[self.fed:len(context) - 1]  # the root's entry is written when drafting from it
            kept = 0
            while kept < min(len(self.drafted), len(committed)) and self.drafted[kept] == committed[kept]:
                kept += 1
            self.cache.rollback(self.cache.length - len(self.drafted) + kept)
            self.cache.trim()
            self.fed += kept
        self.drafted = []
        with torch.inference_mode():
            self.state.after_step(self.cache)

    def _drop(self) -> None:
        """No memory left: the cache goes back; the next proposal builds it again."""
        self.cache.free()
        self.state = None
        self.drafted = []

    @torch.inference_mode()
    def _fused(self, drafters: list["CompressedDrafter"], contexts: list[list[int]], runner) -> list[DraftTree]:
        """Draft through the runner's fused greedy chunks (on a GPU: captured graphs over the small caches): one pass
        feeds every cache the committed tokens it lacks, then one chunk of `num_draft` greedy steps from each root.
        The entries the chunk writes (the root's and all drafts' but the last) stay: the next proposal keeps those
        the target accepted (`_prepare`), so an accepted draft is not fed again."""
        trees = [DraftTree() for _ in drafters]  # each sequence its own (a plan may keep and change it)
        layers = self.net.config.num_layers
        specs, fed, ready = [], [], []
        for i, (d, context) in enumerate(zip(drafters, contexts)):
            new = list(range(d.fed, len(context) - 1))
            try:
                d.cache.ensure(d.cache.length + len(new) + d.num_draft)
            except PoolFull:
                d._drop()
                continue
            ready.append(i)
            if new:
                d.note_pass("target", len(new), d.cache.length, layers=layers, of=layers)
                specs.append(RowSpec(d.cache, [context[j] for j in new], new))
                fed.append((d, len(new)))
        if specs:
            runner.run(specs)
        for d, n in fed:
            d.cache.length += n
            d.fed += n
        by_depth: dict[int, list[int]] = {}
        for i in ready:
            by_depth.setdefault(drafters[i].num_draft, []).append(i)
        for depth, rows in by_depth.items():
            for i in rows:
                d = drafters[i]
                d.note_pass("target", 1, d.cache.length, layers=layers, of=layers, steps=depth)
            run = runner.greedy_chunks([drafters[i].cache for i in rows], [contexts[i][-1] for i in rows],
                                       [len(contexts[i]) - 1 for i in rows], depth, 1)
            try:
                drafts = next(run)
            finally:
                run.close()
            for i, tokens in zip(rows, drafts):
                d = drafters[i]
                d.fed = len(contexts[i])  # the root's entry
                d.drafted = tokens[:depth - 1]  # their entries follow the root's
                trees[i] = DraftTree.chain(tokens[:depth])
        return trees

    def _sync(self, context: list[int]) -> torch.Tensor | None:
        new = list(range(self.fed, len(context)))
        logits = self._feed([context[i] for i in new], new, last_only=True)[-1]
        self.fed = len(context)
        self.base = self.cache.length  # draft tokens go after this; rolled back when drafting ends
        return logits

    def _release(self, root: int) -> None:
        if self.state is not None and self.base is not None and self.cache.length > self.base:
            self.cache.rollback(self.base)
        self.cache.trim()
