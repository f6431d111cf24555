"""CUDA-graph replay of the decode / verify step: one graph per forward-width bucket.

At batch 1 a small model's step is a few hundred tiny kernels, and launching them from Python costs more than
running them. Capturing the step once per width bucket (1, 2, 4, ... tokens) and replaying it removes the launch
cost. Shapes are static: inputs live in fixed buffers, the write position `start` is a device tensor, attention
spans every cache slot (empty slots are masked by their position), and a step narrower than its bucket is padded
with tokens at position EMPTY that see only themselves. Chains use the lower-triangular mask, so one graph serves
chains and trees. Prefill, batches and drafter passes (own cache, skipped layers) run eagerly.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .kv_cache import EMPTY, KVCache
from .transformer import Transformer

BUCKETS = (1, 2, 4, 8, 16, 32, 64)
# Decode steps per replay of the fused greedy graphs: long chunks for plain decoding and for drafters the budget
# has backed off, short ones after an empty draft (a drafter that may find a match a few tokens later).
GREEDY_SIZES = (16, 4)


class GraphedModel(nn.Module):
    def __init__(self, model: Transformer, buckets: tuple[int, ...] = BUCKETS) -> None:
        super().__init__()
        self.model, self.buckets = model, buckets
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor], torch.Tensor]] = {}
        self.pool = None
        self.greedy: dict[int, tuple] = {}  # steps -> fused greedy graph (graph, buffers, tokens), see greedy_chunks

    def compile_blocks(self) -> None:
        """Capture graphs over torch.compile'd blocks (fewer, fused kernels per step); recaptures if needed."""
        self.model.compile_blocks()
        if self.model.cache is not None and self.model.cache.batch_size == 1:
            self._capture_all()

    # the interface the engine and the drafters use
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def cache(self) -> KVCache | None:
        return self.model.cache

    def make_cache(self, batch_size: int, max_len: int) -> KVCache:
        return self.model.make_cache(batch_size, max_len)

    def setup_cache(self, batch_size: int, max_len: int) -> KVCache:
        old = self.model.cache
        cache = self.model.setup_cache(batch_size, max_len)
        if cache is not old or not self.graphs:  # new buffers (graphs over the old ones are stale), or none yet
            self.graphs.clear()
            self.pool = None
            if batch_size == 1:
                self._capture_all()
        return cache

    def _capture_all(self) -> None:
        # A fresh memory pool each time: recapturing into the pool of released graphs trips the caching allocator.
        self.graphs.clear()
        self.greedy = {}
        self.pool = None
        torch.cuda.synchronize()
        for b in self.buckets:
            if b <= self.model.cache.max_len:
                self.graphs[b] = self._capture(b)
        for steps in GREEDY_SIZES:
            if steps + 1 <= self.model.cache.max_len:
                self.greedy[steps] = self._capture_greedy(steps)
        self.model.cache.reset()

    @torch.inference_mode()
    def _capture_greedy(self, steps: int):
        """`steps` chained width-1 decode steps, each feeding its own argmax to the next, in one graph.

        Plain greedy decoding needs nothing from the host between tokens, so the host launches one replay per
        `steps` tokens and reads them all with one synchronization, instead of one launch and one sync per token.
        """
        cache, dev = self.model.cache, self.device
        buffers = {"token": torch.zeros(1, 1, dtype=torch.long, device=dev),
                   "pos": torch.zeros(1, 1, dtype=torch.long, device=dev),
                   "start": torch.zeros((), dtype=torch.long, device=dev),
                   "mask": torch.ones(1, 1, dtype=torch.bool, device=dev)}
        out = torch.zeros(steps, dtype=torch.long, device=dev)

        def chain():
            for i in range(steps):
                logits = self.model(buffers["token"], buffers["pos"], start=buffers["start"], kv_len=cache.max_len,
                                    tree_mask=buffers["mask"])
                out[i] = logits[0, -1].argmax()
                buffers["token"].copy_(out[i].view(1, 1))
                buffers["pos"].add_(1)
                buffers["start"].add_(1)

        # Host-side double buffers, allocated once: pinning memory per call would cost more than a short chunk.
        host = [torch.empty(steps, dtype=torch.long, pin_memory=True) for _ in range(2)]
        return self._record(chain), buffers, out, host, [torch.cuda.Event() for _ in range(2)]

    def _record(self, fn) -> torch.cuda.CUDAGraph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: lazy initialization must not happen during capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        self.pool = graph.pool()
        return graph

    @property
    def greedy_sizes(self) -> tuple[int, ...]:
        """Tokens per chunk that `greedy_chunks` offers, longest first; empty when no fused greedy graph is
        captured (batch > 1, tiny cache)."""
        return tuple(sorted(self.greedy, reverse=True))

    def greedy_chunks(self, token: int, position: int, chunks: int, steps: int) -> Iterator[list[int]]:
        """Feed `token` at `position`, decode greedily; yield up to `chunks` lists of `steps` tokens.

        Equal to that many single greedy steps (same kernels, argmax on the device). Pipelined: the graph updates
        its own inputs, so the next chunk is launched before the host reads this one, and launch cost hides behind
        the GPU's work. Closing the iterator early rolls back a chunk launched but not consumed.
        """
        graph, buf, out, host, done = self.greedy[steps]
        own = self.model.cache
        consumed = own.length

        def launch(i: int) -> None:
            own.check_room(steps)
            graph.replay()
            own.length += steps
            host[i % 2].copy_(out, non_blocking=True)
            done[i % 2].record()

        buf["token"].fill_(token)
        buf["pos"].fill_(position)
        buf["start"].fill_(own.length)
        launched = 0
        try:
            for i in range(chunks):
                while launched < min(i + 2, chunks):
                    launch(launched)
                    launched += 1
                done[i % 2].synchronize()
                consumed += steps
                yield host[i % 2].tolist()
        finally:
            done[(launched - 1) % 2].synchronize()
            own.rollback(consumed)

    @torch.inference_mode()
    def _capture(self, width: int):
        cache, dev = self.model.cache, self.device
        buffers = {
            "ids": torch.zeros(1, width, dtype=torch.long, device=dev),
            "pos": torch.full((1, width), EMPTY, dtype=torch.long, device=dev),  # harmless: slots stay empty
            "start": torch.zeros((), dtype=torch.long, device=dev),
            "mask": torch.eye(width, dtype=torch.bool, device=dev),
            "chain": torch.ones(width, width, dtype=torch.bool, device=dev).tril_(),
        }

        outputs = []

        def step():
            outputs[:] = [self.model(buffers["ids"], buffers["pos"], start=buffers["start"], kv_len=cache.max_len,
                                     tree_mask=buffers["mask"])]

        graph = self._record(step)
        return graph, buffers, outputs[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor | None = None,
                num_logits: int | None = None, cache: KVCache | None = None,
                skip_layers: frozenset[int] | set[int] = frozenset(), **kwargs) -> torch.Tensor:
        t = input_ids.shape[1]
        width = next((b for b in self.buckets if b >= t), None)
        eager = (cache is not None or skip_layers or num_logits is not None or kwargs or input_ids.shape[0] != 1
                 or width not in self.graphs)
        if eager:
            return self.model(input_ids, positions, tree_mask=tree_mask, num_logits=num_logits, cache=cache,
                              skip_layers=skip_layers, **kwargs)
        own = self.model.cache
        own.check_room(width)
        graph, buf, out = self.graphs[width]
        buf["ids"][:, :t].copy_(input_ids)
        buf["pos"][:, :t].copy_(positions)
        buf["pos"][:, t:].fill_(EMPTY)
        mask = buf["mask"]
        mask.zero_()
        if tree_mask is None:
            mask[:t, :t].copy_(buf["chain"][:t, :t])
        else:
            mask[:t, :t].copy_(tree_mask)
        buf["start"].fill_(own.length)
        graph.replay()
        own.length += t  # the padding slots beyond hold position EMPTY: invisible, overwritten next step
        return out[:, :t].clone()
