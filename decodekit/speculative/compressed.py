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

    def finish(self, tokens: list[int]) -> None:
        self.cache.free()
        self.state = None

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
        try:
            if self.state is None or self.fed > len(context) - 1:
                self._start(context)
            with torch.inference_mode():
                self.state.after_step(self.cache)
            runner = self.engine.core.runner
            if runner.fused_sizes and not self.state.observed(self.cache):
                return self._fused(context, runner)
            tree = super().propose(context)
            if self.cache.length == 0:  # the pool ran dry while drafting (`propose` emptied the cache): start over
                self.state = None
            return tree
        except PoolFull:
            self.cache.free()
            self.state = None
            return DraftTree()

    @torch.inference_mode()
    def _fused(self, context: list[int], runner) -> DraftTree:
        """Draft through the runner's fused greedy chunks (on a GPU: a captured graph over the small cache): feed the
        committed tokens the cache lacks, then `num_draft` greedy steps from the root; keep the root's entry."""
        root, cache = len(context) - 1, self.cache
        new = list(range(self.fed, root))
        layers = self.net.config.num_layers
        if new:
            self.note_pass("target", len(new), cache.length, layers=layers, of=layers)
            cache.ensure(cache.length + len(new))
            runner.run([RowSpec(cache, [context[i] for i in new], new)])
            cache.length += len(new)
        keep = cache.length + 1
        cache.ensure(cache.length + self.num_draft)
        self.note_pass("target", 1, cache.length, layers=layers, of=layers, steps=self.num_draft)
        run = runner.greedy_chunks([cache], [context[-1]], [root], self.num_draft, 1)
        try:
            tokens = next(run)[0]
        finally:
            run.close()
        cache.rollback(keep)
        cache.trim()
        self.fed = root + 1
        return DraftTree.chain(tokens[:max(self.num_draft, 0)])

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
