"""Best-first beam search (Meister, Vieira and Cotterell 2020, "Best-First Beam Search", TACL).

Hypotheses wait in one priority queue ordered by score (the sum of their tokens' log-probabilities, which only falls
as a hypothesis grows). The best one is popped; at most `num_beams` hypotheses of each length may be popped (a popped
hypothesis past that budget is dropped); a popped hypothesis that ended (EOS, a stop string, the length limit) goes
back as final, any other is expanded: its continuations join the queue. The search stops when a final hypothesis is
on top. With monotone scores this returns the same hypothesis as beam search of width `num_beams` (every beam
keeping its `num_beams` best hypotheses per length, ended ones carried along), expanding no more hypotheses than it
does; without the budget (`num_beams` 0) it is exact search (Dijkstra's algorithm): the most probable output.

On the engine each expanded hypothesis is a sequence forked from its parent's (KV shared); hypotheses that wait are
paused and take no part in passes. Each pass expands the hypotheses the queue needs next and, speculatively, the next
best ones (up to `num_beams`, or 8 for exact search): the result is the same as popping one at a time, since the
queue is replayed in order and only ever pops a hypothesis whose continuations are known.
"""
from __future__ import annotations

import heapq
import itertools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..engine.policy import Policy
from .base import (Hypothesis, PolicySearch, SearchResult, check, extended_logprobs, finish_all, fork,
                   hypothesis_result, keep_root, kept_row, register)

EXACT_BATCH = 8  # hypotheses expanded per pass by exact search (no per-length budget to bound them)


@register
@dataclass
class BestFirstBeam(PolicySearch):
    """Knobs (defaults): `num_beams` (4: hypotheses popped per length; 0: no budget, exact search), `num_return`
    (1: final hypotheses to collect, best first), `max_expansions` (100000: stop expanding after this many and
    return the best found)."""

    name = "best_first_beam"
    num_beams: int = 4
    num_return: int = 1
    max_expansions: int = 100_000

    def __post_init__(self) -> None:
        check(isinstance(self.num_beams, int) and self.num_beams >= 0,
              f"{self.name}: num_beams must be an integer >= 0 (0: exact search)")
        check(isinstance(self.num_return, int) and self.num_return >= 1, f"{self.name}: num_return must be >= 1")
        check(self.max_expansions >= 1, f"{self.name}: max_expansions must be >= 1")

    def policy(self, engine, req) -> "BestFirstPolicy":
        return BestFirstPolicy(self, engine, req)


@dataclass(eq=False)
class Node:
    """A hypothesis: its output tokens and score; once expanded, its sequence and next-token scores."""

    tokens: list[int]
    score: float
    parent: "Node | None"
    ended: str | None = None  # "stop" | "length" once the hypothesis is complete
    seq: Any = None
    row: torch.Tensor | None = None  # raw logits after its tokens `[1, V]`, kept when logprobs are recorded
    logp: torch.Tensor | None = None  # processed next-token log-probabilities `[V]`, until it is popped
    open: int = 0  # children that may still fork from its sequence
    popped: bool = False


@dataclass
class Queue:
    """The priority queue (best score first; ties: first pushed), and pops per length."""

    heap: list = field(default_factory=list)
    ticket: Any = field(default_factory=itertools.count)
    pops: Counter = field(default_factory=Counter)

    def push(self, node: Node, final: bool = False) -> None:
        heapq.heappush(self.heap, (-node.score, next(self.ticket), final, node))

    def top(self) -> tuple[Node, bool]:
        _, _, final, node = self.heap[0]
        return node, final

    def pop(self) -> None:
        heapq.heappop(self.heap)


class BestFirstPolicy(Policy):
    def __init__(self, search: BestFirstBeam, engine, req) -> None:
        self.search = search
        self.k = search.num_beams or float("inf")
        self.batch = search.num_beams or EXACT_BATCH
        self.eos = set() if req.ignore_eos else set(engine.eos_ids)
        self.stops = bool(req.stop)
        self.queue = Queue()
        self.expanding: dict[Any, Node] = {}  # sequences whose pass gives their node's continuations
        self.results: list[Node] = []
        self.expansions = 0
        self.root: Node | None = None
        self.done = False

    def finished(self, req) -> bool:
        return self.done

    def step(self, core, req, rows) -> list:
        for seq, (logits, _) in rows.items():
            node = self.expanding.pop(seq, None)
            if node is None and self.root is None:
                node = self.root = Node([], 0.0, None)
                self.queue.push(node)
            if node is None:  # a paused sequence that re-prefilled after a preemption: nothing new
                continue
            node.seq, node.row = seq, kept_row(seq, logits)
            node.logp = seq.next_logits(logits[:1]).log_softmax(-1)[0]
            seq.paused = True
        if self.expanding:
            return []  # a hypothesis of this round is still catching up (preempted)
        return self._advance(core, req)

    # ---- the queue ---------------------------------------------------------------------------------------------
    def _advance(self, core, req) -> list:
        """Replay the best-first loop until it needs continuations nobody computed yet, then expand."""
        q = self.queue
        while q.heap and not self.done:
            node, final = q.top()
            length = len(node.tokens)
            if final:
                q.pop()
                self.results.append(node)
                self.done = len(self.results) >= self.search.num_return
            elif q.pops[length] >= self.k:
                q.pop()
                self._drop(node)
            elif node.ended is not None:
                q.pop()
                q.pops[length] += 1
                q.push(node, final=True)
            elif node.logp is None:
                if self.expansions < self.search.max_expansions:
                    return self._expand(core)
                self.done = True
            else:
                q.pop()
                q.pops[length] += 1
                self._push_children(node)
        self.done = True
        finish_all(req)
        return list(req.sequences)

    def _ends(self, node: Node, token: int) -> str | None:
        if token in self.eos:
            return "stop"
        if self.stops and node.seq.stopper.fork().push(token):
            return "stop"
        return "length" if node.seq.room <= 1 else None

    def _push_children(self, node: Node) -> None:
        node.popped = True
        scores = node.logp + node.score
        finite = int(torch.isfinite(scores).sum())
        top = scores.topk(min(finite, self.k if self.k != float("inf") else finite))  # more can never be popped
        for token, score in zip(top.indices.tolist(), top.values.tolist()):
            child = Node(node.tokens + [token], score, node, self._ends(node, token))
            node.open += child.ended is None
            self.queue.push(child)
        node.logp = None  # its children hold what they need: [V] floats per popped hypothesis add up
        self._release(node)

    def _release(self, node: Node) -> None:
        """Finish a popped hypothesis's sequence once no child can fork from it any more."""
        if node.popped and node.open <= 0 and node.seq is not None and not node.seq.finished:
            node.seq.paused = False
            node.seq.finish("abort")

    def _drop(self, node: Node) -> None:
        if node.seq is not None and not node.seq.finished:  # expanded ahead of need, then over the budget
            node.seq.paused = False
            node.seq.finish("abort")
        elif node.ended is None and node.parent is not None:
            node.parent.open -= 1
            self._release(node.parent)

    def _expand(self, core) -> list:
        """Fork the sequences of the next best hypotheses without continuations (the one the queue needs first)."""
        picked = []
        for _, _, final, node in heapq.nsmallest(len(self.queue.heap), self.queue.heap):
            if len(picked) >= self.batch:
                break
            if not final and node.ended is None and node.logp is None and self.queue.pops[len(node.tokens)] < self.k:
                picked.append(node)
        changed = []
        for node in picked:
            parent = node.parent
            keep_root(parent.seq)
            child = fork(core, parent.seq, self.search.name)
            child.record_logprobs(parent.row, child.commit(node.tokens[-1:]))
            self.expanding[child] = node
            node.logp = None
            parent.open -= 1
            self._release(parent)
            self.expansions += 1
            changed.append(child)
        return changed

    def outcome(self, req) -> SearchResult:
        found = self.results or sorted((entry[3] for entry in self.queue.heap if entry[3].ended),
                                       key=lambda n: -n.score)[:self.search.num_return]
        hyps = [Hypothesis(n.score, n.tokens, n.parent.seq, n.ended,
                           extended_logprobs(n.parent.seq, n.parent.row, n.tokens[-1])) for n in found if n.parent]
        results = [hypothesis_result(h) for h in hyps] or [req.sequences[0].result()]
        return SearchResult(results[0], results)
