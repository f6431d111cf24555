"""CUDA-graph replay of the engine's passes: a graph per (batch bucket, width bucket, KV-length bucket, hidden layers).

A small model's step is a few hundred tiny kernels; launching them from Python costs more than running them. Each
pass shape is captured once over static buffers and replayed: the host lays the rows out (`layout_group`), copies
one int64 buffer to the device, and replays. Rows are padded to a batch bucket (padding rows write to the scratch
block), widths to a width bucket (padding tokens see only themselves), KV lengths to a power of two (entries past
a row's tokens read the scratch block), so the captured set stays small and a long cache costs only where it is
used. Sliding-window rings add, per ring, the rows' ring blocks and write slots to the buffer; their tables (a
ring's span wide) are computed inside the pass from the rows' lengths, as the full pool's. Greedy steps without a
draft run as fused chunks: `steps` single-token passes in one graph, each feeding its own argmax to the next, all
rows at once; chunks are pipelined (the next is launched before the host reads this one). Greedy sequences whose
drafter drafts on the device (`Drafter.propose_on_device`) run fused draft rounds the same way: several
draft -> verify -> commit rounds per replay (`StaticDraftRounds`, `speculative/device.py`). A pass whose sequences
read the target's features (draft heads) also copies the requested layers' states out of the graph. Prefill chunks
that need no logits, and passes wider than the largest bucket, run eagerly; draft heads capture their own passes
with `GraphRunner.capture` (`speculative/heads_common.py`).
"""
from __future__ import annotations

from contextlib import closing
from dataclasses import astuple
from typing import Callable, Iterator

import torch

from ..models.batch import ForwardBatch, RingRows, RowSpec, Rows, bucket, layout_group
from ..models.kv_cache import KVPool, SeqKV, ring_slot_table, slot_table
from ..models.transformer import Transformer
from ..speculative.base import Drafter
from ..speculative.device import accept_chain, committed_tokens, window_columns
from .runner import ModelRunner

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WIDTH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
GREEDY_SIZES = (16, 4)  # decode steps per fused greedy chunk: long for plain decoding, short after an empty draft
DRAFT_ROUNDS = 4  # draft -> verify -> commit rounds per replay of fused draft rounds
MAX_GRAPH_TOKENS = 2048  # rows x width of the largest captured pass (its logits are copied out of the graph)
MIN_KV = 256


def kv_bucket(n: int, block_size: int) -> int:
    """Entries a captured pass reads per row: a power of two >= n (at least MIN_KV), in whole blocks."""
    length = max(MIN_KV, 1 << (n - 1).bit_length())
    return -(-length // block_size) * block_size


class StaticPass:
    """One captured pass shape: `rows` sequences x `width` tokens reading `length` entries each (`steps` > 0: a
    fused greedy chunk of `steps` single-token passes), returning the states of `hidden` layers too (`hidden_layers`
    of `Transformer.forward`). Static buffers; `fill` copies a layout in, `replay` runs."""

    def __init__(self, runner: "GraphRunner", rows: int, width: int, length: int, steps: int = 0,
                 hidden: tuple[int, ...] = ()) -> None:
        self.runner, self.rows, self.width, self.length, self.steps = runner, rows, width, length, steps
        self.hidden = hidden
        dev = runner.device
        n, blocks = rows * width, length // runner.pool.block_size
        self.sizes = [n, n, n, rows * blocks, rows, rows]  # tokens, positions, write slots, tables, ctx, valid
        self.rings = list(getattr(runner.pool, "rings", ()))
        for ring in self.rings:  # sliding-window rings: their write slots and blocks
            self.sizes += [n, rows * ring.n_blocks]
        total = sum(self.sizes)
        self.host = torch.zeros(total, dtype=torch.long, pin_memory=runner.cuda)
        self.dev = torch.zeros(total, dtype=torch.long, device=dev)
        parts = self.dev.split(self.sizes)
        self.tokens, self.positions, self.write_slots, tables, self.ctx, self.valid = parts[:6]
        self.tables = tables.view(rows, blocks)
        self.ring_writes = list(parts[6::2])
        self.ring_tables = [t.view(rows, ring.n_blocks) for t, ring in zip(parts[7::2], self.rings)]
        self.tree = torch.eye(width, dtype=torch.bool, device=dev).repeat(rows, 1, 1)
        self.chain = torch.ones(width, width, dtype=torch.bool, device=dev).tril_().repeat(rows, 1, 1)
        self.out = self._output()  # what a replay hands the host (a greedy chunk's tokens)
        # Where pipelined replays copy `out` (pinned once here: allocating pinned memory costs about 0.5 ms a call).
        self.host_out = [torch.empty(self.out.shape, dtype=torch.long, pin_memory=runner.cuda) for _ in range(2)]
        self.graph = runner.capture(self._body())

    def _output(self) -> torch.Tensor:
        return torch.zeros(self.rows, max(self.steps, 1), dtype=torch.long, device=self.runner.device)

    def _body(self) -> Callable[[], None]:
        return self._chunk if self.steps else self._pass

    def _batch(self, width: int, ctx: torch.Tensor, valid: torch.Tensor, tree, write_slots, tokens, positions,
               read: tuple[torch.Tensor, torch.Tensor] | None = None, rings: list[RingRows] | None = None,
               ring_writes: list[torch.Tensor] | None = None):
        """`read`: (slot table, ctx in its columns) the full pool's layers read instead of the rows' whole tables (a
        view of them: `StaticDraftRounds.window_chain`); writes still go to the rows' own next entries. `rings`,
        `ring_writes`: the ring tables and ring write slots, where the caller has them (a chain of steps builds them
        once: inside a captured graph every op here runs each replay)."""
        bs = self.runner.pool.block_size
        # The rows' whole tables only where a layer reads them or the writes come from them.
        table = slot_table(self.tables, valid, self.length, bs) if read is None or write_slots is None else None
        if rings is None:
            rings = [RingRows(*ring_slot_table(t, valid, ring.span, bs)) for t, ring in zip(self.ring_tables,
                                                                                                   self.rings)]
        ring_writes = self.ring_writes if ring_writes is None else ring_writes
        if write_slots is None:  # a chunk step: each row writes its entries [ctx, ctx + width)
            entries = ctx[:, None] + torch.arange(width, device=ctx.device)
            write_slots = table.gather(1, entries).flatten()
            ring_writes = [rr.table.gather(1, entries - rr.first[:, None]).flatten() for rr in rings]
        if read is not None:  # ring layers read column ctx - first of their ring: shift `first` with `ctx`
            table, view_ctx = read
            rings = [RingRows(rr.table, rr.first - (ctx - view_ctx)) for rr in rings]
            ctx = view_ctx
        return ForwardBatch(tokens, positions, write_slots, [Rows(0, self.rows, width, table, ctx, tree, None, rings)],
                            ring_writes=ring_writes)

    def _pass(self) -> None:
        batch = self._batch(self.width, self.ctx, self.valid, self.tree, self.write_slots, self.tokens,
                            self.positions)
        batch.hidden_layers = self.hidden
        out = self.runner.graph_model(batch, self.runner.pool, compiled=self.runner.compiled)
        logits = out[0] if self.hidden else out
        self.runner.logits[:logits.shape[0]].copy_(logits)
        if self.hidden:
            self.runner.hidden_buffer(out[1].shape[1])[:logits.shape[0]].copy_(out[1])

    def _chunk(self) -> None:
        for i in range(self.steps):
            batch = self._batch(1, self.ctx, self.ctx + 1, None, None, self.tokens, self.positions)
            logits = self.runner.graph_model(batch, self.runner.pool, compiled=self.runner.compiled)
            nxt = logits.argmax(-1)
            self.out[:, i].copy_(nxt)
            self.tokens.copy_(nxt)
            self.positions.add_(1)
            self.ctx.add_(1)

    def fill(self, specs: list[RowSpec], tree: bool) -> list[int]:
        """Copy the rows' layout in; returns the flat rows whose logits the specs asked for."""
        g = layout_group(specs, self.width, self.rows, self.length, self.runner.pool.block_size)
        parts = [torch.tensor(g.tokens), torch.tensor(g.positions), torch.tensor(g.write_slots), g.tables.flatten(),
                 g.ctx, g.valid]
        for writes, blocks in zip(g.ring_writes, g.ring_tables):
            parts += [torch.tensor(writes, dtype=torch.long), blocks.flatten()]
        torch.cat(parts, out=self.host)
        self.dev.copy_(self.host, non_blocking=True)
        if g.tree is not None:
            self.tree.copy_(g.tree, non_blocking=True)
        elif tree:
            self.tree.copy_(self.chain)
        return g.logit_rows

    def replay(self) -> None:
        self.graph.replay()

    def _row_state(self) -> list[tuple[torch.Tensor, int]]:
        """The buffers that carry each row's state from replay to replay, `[rows, ...]`, with their padding value."""
        return [(self.tokens.view(self.rows, -1), 0), (self.positions.view(self.rows, -1), 0), (self.tables, 0),
                (self.ctx, 0), (self.valid, 0)] + [(t, 0) for t in self.ring_tables]

    def take_rows(self, other: "StaticPass", keep: list[int]) -> None:
        """Go on with rows `keep` of `other` (a pass of as many rows or fewer, its buckets otherwise the same) where
        its last replay leaves them: their block tables, entry counts, positions, tokens (and a rounds pass's token
        histories), copied on the device after what is queued there (no host layout, no synchronization); the other
        rows pad."""
        index = torch.tensor(keep, dtype=torch.long).to(self.runner.device, non_blocking=True)
        k = len(keep)
        for (mine, pad), (theirs, _) in zip(self._row_state(), other._row_state()):
            mine[:k] = theirs.index_select(0, index)
            mine[k:] = pad


class StaticDraftRounds(StaticPass):
    """`rounds` draft -> verify -> commit rounds of `rows` greedy sequences in one graph. Each round, every row's
    drafter proposes a chain of up to `depth` (a device scalar, at most `width - 1`) tokens from the row's token
    history (`Drafter.propose_on_device`), root + chain is scored in one pass, and the prefix the target's argmax
    agrees with is committed with the next token, on the device (`speculative/device.py`): history, positions and
    entry counts advance by what each row kept; rejected entries lie past the row's count and the next round
    overwrites them. `out` holds per row and round: the draft (width - 1), the committed tokens (width, the first
    `kept` of them count), `kept` and the draft's length."""

    def __init__(self, runner: "GraphRunner", rows: int, width: int, length: int, history: int, rounds: int,
                 drafter: Drafter) -> None:
        self.drafter, self.rounds = drafter, rounds
        self.history = torch.zeros(rows, history, dtype=torch.long, device=runner.device)
        self.history_len = torch.ones(rows, dtype=torch.long, device=runner.device)  # padding rows: one token
        self.depth = torch.zeros((), dtype=torch.long, device=runner.device)
        super().__init__(runner, rows, width, length)

    def _output(self) -> torch.Tensor:
        return torch.zeros(self.rows, self.rounds, 2 * self.width + 1, dtype=torch.long, device=self.runner.device)

    def _body(self) -> Callable[[], None]:
        return self._rounds

    def _rounds(self) -> None:
        rows, w = self.rows, self.width
        cols = torch.arange(w, device=self.ctx.device)
        root_pos = self.positions.view(rows, w)[:, :1]  # the state carried from round to round (and replay to replay)
        for i in range(self.rounds):
            root = self.history.gather(1, self.history_len[:, None] - 1)
            draft, n_draft = self.drafter.propose_on_device(self.history, self.history_len, w - 1, self)
            n_draft = torch.minimum(n_draft, self.depth)
            batch = self._batch(w, self.ctx, self.ctx + w, self.chain, None, torch.cat([root, draft], 1).flatten(),
                                (root_pos + cols).flatten())
            batch.groups[0].tree_kernel = True  # measured: rounds gain from the kernel where host-drafted steps lost
            logits = self.runner.graph_model(batch, self.runner.pool, compiled=self.runner.compiled)
            accepted, nxt = accept_chain(draft, n_draft, logits.argmax(-1).view(rows, w))
            new = committed_tokens(draft, accepted, nxt)
            kept = accepted + 1
            self.history.scatter_(1, self.history_len[:, None] + cols, new)
            self.out[:, i].copy_(torch.cat([draft, new, kept[:, None], n_draft[:, None]], dim=1))
            self.history_len.add_(kept)
            self.ctx.add_(kept)
            root_pos.add_(kept[:, None])

    def window_chain(self, steps: int, sink: int, window: int) -> torch.Tensor:
        """`[rows, steps]` greedy tokens after each row's root from the target itself reading only a StreamingLLM view
        of its own cache (the first `sink` entries and the last `window` before the root, `window_columns`) in its
        full-cache layers; sliding-window layers read their window as always. Each step writes its token's key and
        value where the verify pass that follows writes them again (over the full cache), so nothing is kept of the
        draft's own."""
        rows, bs = self.rows, self.runner.pool.block_size
        ctx = self.ctx
        table = slot_table(self.tables, ctx + steps, self.length, bs)
        cols, base = window_columns(ctx, sink, window, steps)
        view = table.gather(1, cols.clamp_max(self.length - 1))  # columns past a row's entries are never read
        positions = self.positions.view(rows, self.width)[:, 0]
        token = self.history.gather(1, self.history_len[:, None] - 1)[:, 0]
        # Every step's write slots, and ring tables covering all the steps' entries (a step reads its ring's columns
        # up to its own entry only), built once for the chain.
        entries = ctx[:, None] + torch.arange(steps, device=ctx.device)
        rings = [RingRows(*ring_slot_table(t, ctx + steps, ring.span, bs)) for t, ring in zip(self.ring_tables,
                                                                                                     self.rings)]
        writes = table.gather(1, entries)
        ring_writes = [rr.table.gather(1, entries - rr.first[:, None]) for rr in rings]
        drafts = []
        for j in range(steps):
            batch = self._batch(1, ctx + j, ctx + j + 1, None, writes[:, j], token, positions + j,
                                read=(view, ctx + j - base + sink), rings=rings,
                                ring_writes=[w[:, j] for w in ring_writes])
            token = self.runner.graph_model(batch, self.runner.pool, compiled=self.runner.compiled).argmax(-1)
            drafts.append(token)
        return torch.stack(drafts, dim=1)

    def _row_state(self) -> list[tuple[torch.Tensor, int]]:
        return super()._row_state() + [(self.history, 0), (self.history_len, 1)]

    def take_rows(self, other: "StaticPass", keep: list[int]) -> None:
        super().take_rows(other, keep)
        self.depth.copy_(other.depth)

    def fill_rounds(self, specs: list[RowSpec], contexts: list[list[int]], depth: int) -> None:
        """The rows' layout (each spec: its root alone), their token histories and the draft depth."""
        self.fill(specs, tree=False)
        history = torch.zeros(self.history.shape, dtype=torch.long)
        length = torch.ones(self.rows, dtype=torch.long)
        for r, context in enumerate(contexts):
            history[r, :len(context)] = torch.tensor(context, dtype=torch.long)
            length[r] = len(context)
        self.history.copy_(history)
        self.history_len.copy_(length)
        self.depth.fill_(depth)


class GraphRunner(ModelRunner):
    """The engine's runner on a GPU: captured passes where shapes allow, the eager runner elsewhere."""

    pass_class = StaticPass  # what `_pass` builds (tensor parallelism: one that every rank captures and replays)
    drafts_on_device = True
    rounds_per_replay = DRAFT_ROUNDS
    # Whether fused chunks and rounds move the rows still decoding to a smaller pass on the device (`take_rows`).
    regroups_rows = True

    def __init__(self, model: Transformer, pool: KVPool) -> None:
        super().__init__(model, pool, GREEDY_SIZES)
        self.graph_model = model  # what the captured passes run (a tensor-parallel rank 0: its own shard)
        self.compiled = model.compiled_blocks is not None
        self.cuda = model.device.type == "cuda"  # elsewhere (tests on the CPU) a "replay" calls the function
        self.passes: dict[tuple[int, int, int, int, tuple[int, ...]], StaticPass] = {}
        self.round_passes: dict[tuple, StaticDraftRounds] = {}
        self.mempool = None
        self.logits = torch.empty(MAX_GRAPH_TOKENS, model.config.vocab_size, dtype=model.dtype, device=model.device)
        self.hidden: dict[int, torch.Tensor] = {}  # features copied out of the graphs, by width (layers x hidden)
        self.events = [torch.cuda.Event() if self.cuda else _Done() for _ in range(2)]

    def capture(self, fn: Callable[[], None]):
        """Record `fn` (over static buffers that hold padding: warm-up runs write only to the scratch block)."""
        if not self.cuda:
            return _Eager(fn)
        torch.cuda.synchronize()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up: compilation and lazy initialization must not happen during capture
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.mempool):
            fn()
        self.mempool = graph.pool()
        return graph

    def hidden_buffer(self, size: int) -> torch.Tensor:
        """The static buffer the passes copy `size` columns of features into (allocated before any capture uses it)."""
        if size not in self.hidden:
            self.hidden[size] = torch.empty(MAX_GRAPH_TOKENS, size, dtype=self.model.dtype, device=self.device)
        return self.hidden[size]

    def _pass(self, rows: int, width: int, length: int, steps: int = 0, hidden: tuple[int, ...] = ()) -> StaticPass:
        key = (rows, width, length, steps, hidden)
        if key not in self.passes:
            if hidden:
                self.hidden_buffer(len(hidden) * self.model.config.hidden_size)
            self.passes[key] = self.pass_class(self, rows, width, length, steps, hidden)
        return self.passes[key]

    def run(self, specs: list[RowSpec], hidden_layers: tuple[int, ...] = ()):
        graphable = [s for s in specs if s.logits == "all" and len(s.tokens) <= WIDTH_BUCKETS[-1]
                     and s.observer is None]  # a row a KV press observes runs eagerly
        width = bucket(max((len(s.tokens) for s in graphable), default=1), WIDTH_BUCKETS)
        rows = bucket(len(graphable), BATCH_BUCKETS)
        if not graphable or rows > BATCH_BUCKETS[-1] or rows * width > MAX_GRAPH_TOKENS:
            return super().run(specs, hidden_layers)
        rest = [s for s in specs if s not in graphable]
        eager = super().run(rest, hidden_layers) if rest else None
        length = kv_bucket(max(s.kv.length + width for s in graphable), self.pool.block_size)
        static = self._pass(rows, width, length, hidden=hidden_layers)
        wanted = static.fill(graphable, tree=any(s.tree is not None for s in graphable) or width > 1)
        # Before the replay: a blocking host-to-device copy after it would wait for the pass, and the host's work
        # meanwhile (grammar masks) would no longer overlap it.
        wanted = torch.tensor(wanted, device=self.device)
        static.replay()
        # Indexing copies: the rows outlive the next replay, which overwrites the static buffers.
        out = [self.logits[wanted]]
        if hidden_layers:
            out.append(self.hidden[len(hidden_layers) * self.model.config.hidden_size][wanted])
        if eager is not None:  # the eager rows come first, as `first_logit` says
            eager = eager if hidden_layers else (eager,)
            for s in graphable:
                s.first_logit += eager[0].shape[0]
            out = [torch.cat([e, o]) for e, o in zip(eager, out)]
        return tuple(out) if hidden_layers else out[0]

    def greedy_chunks(self, kvs: list[SeqKV], roots: list[int], positions: list[int], steps: int,
                      chunks: int, live: Callable[[], list[bool]] | None = None) -> Iterator[list[list[int]]]:
        n = len(kvs)
        rows = bucket(n, BATCH_BUCKETS)
        if rows > BATCH_BUCKETS[-1]:
            yield from super().greedy_chunks(kvs, roots, positions, steps, chunks)
            return
        length = kv_bucket(max(kv.length for kv in kvs) + steps * chunks, self.pool.block_size)
        static = self._pass(rows, 1, length, steps)
        static.fill([RowSpec(kv, [t], [p], None, "none") for kv, t, p in zip(kvs, roots, positions)], tree=False)
        regroup, orders = self._regrouper(lambda r: self._pass(r, 1, length, steps), n, live)
        with closing(self._pipelined(static, chunks, 2, regroup)) as run:
            for i, out in enumerate(run):
                tokens: list[list[int]] = [[] for _ in kvs]
                for r, row in zip(orders[i], out.tolist()):
                    tokens[r] = row
                    kvs[r].length += steps
                yield tokens

    def _regrouper(self, make_pass: Callable[[int], StaticPass], n: int, live: Callable[[], list[bool]] | None):
        """For `_pipelined`: `regroup(last)` moves the rows that `live()` still wants, once they fit a smaller batch
        bucket, to `make_pass(rows)` (`StaticPass.take_rows`); `orders[i]`: which of the `n` rows each row of the
        i-th replay is."""
        order, orders = list(range(n)), []

        def regroup(last: StaticPass) -> StaticPass:
            nonlocal order
            if live is not None and self.regroups_rows:
                wanted = live()
                keep = [r for r, i in enumerate(order) if wanted[i]]
                if keep and bucket(len(keep), BATCH_BUCKETS) < last.rows:
                    smaller = make_pass(bucket(len(keep), BATCH_BUCKETS))
                    smaller.take_rows(last, keep)
                    last, order = smaller, [order[r] for r in keep]
            orders.append(order)
            return last
        return regroup, orders

    def draft_rounds(self, kvs: list[SeqKV], contexts: list[list[int]], drafter: Drafter, depth: int, rounds: int,
                     chunks: int, live: Callable[[], list[bool]] | None = None
                     ) -> Iterator[list[list[tuple[list[int], list[int]]]]]:
        """Fused draft rounds (`StaticDraftRounds`) for greedy rows whose committed tokens are `contexts` (the last
        one each row's root), drafting up to `depth` tokens with `drafter`'s knobs: yields up to `chunks` times, per
        row, `rounds` pairs (draft, committed tokens). Each row's KV memory must have room for `rounds * chunks *
        draft_width(depth)` more entries; `kv.length` advances with what is yielded. `live()`, asked before each
        replay: which rows still want tokens; once those fit a smaller batch bucket they go on in its pass (moved
        on the device, `take_rows`), and the others get no more rounds (empty lists)."""
        n, width = len(kvs), self.draft_width(depth)
        ahead = rounds * chunks * width
        bs = self.pool.block_size
        length = kv_bucket(max(kv.length for kv in kvs) + ahead, bs)
        # Only the tokens the drafter reads go to the device (a long context's history is a large host copy).
        tails = [c[-drafter.history_tokens:] for c in contexts] if drafter.history_tokens else contexts
        history = kv_bucket(max(len(c) for c in tails) + ahead + width, bs)

        def rounds_pass(rows: int) -> StaticDraftRounds:
            key = (rows, width, length, history, rounds, type(drafter), astuple(drafter))
            if key not in self.round_passes:
                self.round_passes[key] = StaticDraftRounds(self, rows, width, length, history, rounds, drafter)
            return self.round_passes[key]

        static = rounds_pass(bucket(n, BATCH_BUCKETS))
        static.fill_rounds([RowSpec(kv, [c[-1]], [len(c) - 1], None, "none") for kv, c in zip(kvs, contexts)],
                           tails, depth)
        regroup, orders = self._regrouper(rounds_pass, n, live)
        # Launched ahead, a chunk writes up to 2 x rounds x width entries past what the host keeps: a sliding-window
        # ring tolerates `max_pass` of that (`kv_cache.py`); where it is less, each chunk waits for the last.
        pipelined = not self.pool.rings or 2 * rounds * width <= self.pool.max_pass
        with closing(self._pipelined(static, chunks, 2 if pipelined else 1, regroup)) as run:
            for i, out in enumerate(run):
                rows_out: list[list[tuple[list[int], list[int]]]] = [[] for _ in kvs]
                for r, record in zip(orders[i], out.tolist()):
                    for rec in record:
                        kept, n_draft = rec[-2], rec[-1]
                        rows_out[r].append((rec[:n_draft], rec[width - 1:width - 1 + kept]))
                        kvs[r].length += kept
                yield rows_out

    def replays_within(self, longest: int, per_replay: int, replays: int) -> int:
        """How many replays reserving `per_replay` entries each fit in the KV length bucket that `replays` of them
        need after `longest` entries (at least `replays`)."""
        length = kv_bucket(longest + per_replay * replays, self.pool.block_size)
        return max(replays, (length - longest) // per_replay)

    @staticmethod
    def draft_width(depth: int) -> int:
        """The width of the pass that verifies a chain of `depth` drafts (a captured width bucket)."""
        return bucket(depth + 1, WIDTH_BUCKETS)

    def _pipelined(self, static: StaticPass, chunks: int, ahead: int,
                   regroup: Callable[[StaticPass], StaticPass] | None = None) -> Iterator[torch.Tensor]:
        """Replay `static` `chunks` times, `ahead` replays in flight (2: the next runs while the host reads this
        one's output); yields each replay's `out`, on the host. `regroup(last)`, before each launch: the pass to
        replay now (`last`, or one its rows moved to)."""

        def launch(i: int) -> torch.Tensor:
            nonlocal static
            if regroup is not None:
                static = regroup(static)
            static.replay()
            host = static.host_out[i % 2]
            host.copy_(static.out, non_blocking=True)
            self.events[i % 2].record()
            return host

        hosts = []
        try:
            for i in range(chunks):
                while len(hosts) < min(i + ahead, chunks):
                    hosts.append(launch(len(hosts)))
                self.events[i % 2].synchronize()
                yield hosts[i]
        finally:
            if hosts:  # a replay launched ahead and not consumed: written past each row's length, so nothing
                self.events[(len(hosts) - 1) % 2].synchronize()  # reads it; the next pass overwrites it


class _Eager:
    """A "graph" off the GPU: replaying calls the function (the CPU tests run the static-buffer path this way)."""

    def __init__(self, fn: Callable[[], None]) -> None:
        self.replay = fn


class _Done:
    def record(self) -> None:
        pass

    def synchronize(self) -> None:
        pass
