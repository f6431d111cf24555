"""The model runner: one forward pass over every row of a step, and fused greedy chunks.

Rows (`RowSpec`: a prefill chunk, or a root token plus its draft tree) are grouped by width bucket, so a row of one
token is not padded to the width of a 16-token draft beside it, and laid out flat (`models/batch.py`). This eager
runner serves the CPU and any model; `graphs.py` replays captured CUDA graphs on a GPU behind the same
interface.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from ..models.batch import RowSpec, bucket, build_batch
from ..models.kv_cache import KVPool, SeqKV

WIDTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class ModelRunner:
    # Whether it runs fused draft rounds (`draft_rounds`: drafting and greedy acceptance on the device, `graphs.py`).
    drafts_on_device = False

    def __init__(self, model, pool: KVPool, fused_sizes: tuple[int, ...] = ()) -> None:
        self.model, self.pool = model, pool
        # Steps per fused greedy chunk, longest first; () = none (eagerly, a chunk costs what its steps cost: the
        # CPU runs single steps unless a test asks for the eager reference of the chunk path).
        self.fused_sizes = fused_sizes

    @property
    def device(self) -> torch.device:
        return self.model.device

    def group(self, specs: list[RowSpec]) -> list[list[RowSpec]]:
        groups: dict[int, list[RowSpec]] = {}
        for s in specs:
            groups.setdefault(bucket(len(s.tokens), WIDTH_BUCKETS), []).append(s)
        return [groups[w] for w in sorted(groups)]

    def run(self, specs: list[RowSpec], hidden_layers: tuple[int, ...] = ()):
        """One pass over `specs` (each `kv` already owns room for its tokens; `kv.length` is left to the caller).
        Returns the logits of the rows the specs ask for, `[M, V]` (each spec's start in `spec.first_logit`), and
        with `hidden_layers` the hidden states too."""
        batch = build_batch(self.group(specs), self.device, hidden_layers=hidden_layers)
        return self.model(batch, self.pool)

    def greedy_chunks(self, kvs: list[SeqKV], roots: list[int], positions: list[int], steps: int,
                      chunks: int, live: Callable[[], list[bool]] | None = None) -> Iterator[list[list[int]]]:
        """From each row's `root` token at `positions`, decode greedily: yield up to `chunks` times, per row, the next
        `steps` tokens. Each row's KV memory must have room for `steps * chunks` more entries; `kv.length` advances
        with what is yielded. `live()`: which rows still want tokens (a runner may stop decoding the others: they get
        empty lists). The reference implementation: single steps, argmax on the device, every row."""
        tokens, pos = list(roots), list(positions)
        for _ in range(chunks):
            out = torch.empty(len(kvs), steps, dtype=torch.long, device=self.device)
            for i in range(steps):
                specs = [RowSpec(kv, [t], [p]) for kv, t, p in zip(kvs, tokens, pos)]
                nxt = self.run(specs).argmax(-1)
                out[:, i] = nxt
                for kv in kvs:
                    kv.length += 1
                tokens, pos = nxt.tolist(), [p + 1 for p in pos]
            yield out.tolist()
