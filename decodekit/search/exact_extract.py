"""Exact extraction (Castel et al. 2022, "How Optimal is Greedy Decoding for Extractive Question Answering?").

In extractive question answering the answer is a span of the context, and the model's most probable answer is the
span a = c[i:j] (followed by an end token) maximizing
    p(a) = prod_t p(a_t | prompt, a_<t) x p(end | prompt, a).
Greedy decoding can leave the context or miss that span; this finds it exactly. Every span's probability only
falls as the span grows, so a best-first (uniform-cost) search over the spans of the context, branching only into
tokens that continue an occurrence of the current span in the context, pops the best complete answer first: no
other span needs to be scored. The spans the search expands are sequences forked from one another (KV shared),
several per pass.

`context`: the passage the answer must come from (a string, tokenized without special tokens, or token ids;
default: the prompt's tokens); `max_answer_tokens` (32); `end`: the end tokens (default the model's EOS ids; or
token ids, e.g. a newline's). The result's tokens are the span and the most likely end token; its score is log p(a).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

from ..engine.policy import Policy
from .base import (Hypothesis, PolicySearch, SearchResult, check, extended_logprobs, finish_all, fork,
                   hypothesis_result, keep_root, kept_row, register)
from .best_first_beam import EXACT_BATCH, Node, Queue


@register
@dataclass
class ExactExtract(PolicySearch):
    """Knobs (defaults): `context` (None: the prompt), `max_answer_tokens` (32), `end` (None: EOS ids; or a list of
    token ids)."""

    name = "exact_extract"
    context: Any = None
    max_answer_tokens: int = 32
    end: Any = None

    def __post_init__(self) -> None:
        check(isinstance(self.max_answer_tokens, int) and self.max_answer_tokens >= 1,
              f"{self.name}: max_answer_tokens must be an integer >= 1")
        check(self.end is None or (isinstance(self.end, (list, tuple)) and self.end
                                   and all(isinstance(t, int) for t in self.end)),
              f"{self.name}: end must be a list of token ids")

    def policy(self, engine, req) -> "ExtractPolicy":
        context = self.context
        if context is None:
            context = list(req.prompt_ids)
        elif isinstance(context, str):
            context = engine.tokenizer.encode(context, add_special_tokens=False)
        check(isinstance(context, (list, tuple)) and len(context) > 0 and all(isinstance(t, int) for t in context),
              f"{self.name}: context must be a non-empty string or list of token ids")
        end = list(self.end) if self.end is not None else sorted(engine.eos_ids)
        check(bool(end), f"{self.name}: the model has no EOS id; give end=[token ids]")
        return ExtractPolicy(self, list(context), end)


class ExtractPolicy(Policy):
    def __init__(self, search: ExactExtract, context: list[int], end: list[int]) -> None:
        self.search, self.context, self.end = search, context, end
        self.queue = Queue()
        self.where: dict[Node, list[int]] = {}  # span -> start positions of its occurrences in the context
        self.expanding: dict[Any, Node] = {}
        self.answer: Node | None = None
        self.root: Node | None = None
        self.done = False

    def finished(self, req) -> bool:
        return self.done

    def step(self, core, req, rows) -> list:
        for seq, (logits, _) in rows.items():
            node = self.expanding.pop(seq, None)
            if node is None and self.root is None:
                node = self.root = Node([], 0.0, None)
                self.where[node] = list(range(len(self.context)))
            if node is None:
                continue
            node.seq, node.row = seq, kept_row(seq, logits)
            node.logp = seq.next_logits(logits[:1]).log_softmax(-1)[0]
            seq.paused = True
            self._push_children(node)
        if self.expanding:
            return []
        return self._advance(core, req)

    def _push_children(self, node: Node) -> None:
        """The answer ending here, and every span continuing an occurrence of this one."""
        node.popped = True
        if node.tokens:
            ends = node.logp[self.end]
            done = Node(node.tokens + [self.end[int(ends.argmax())]], node.score + float(ends.logsumexp(0)), node,
                        "stop")
            self.queue.push(done, final=True)
        if len(node.tokens) < self.search.max_answer_tokens:
            follow: dict[int, list[int]] = {}
            n = len(node.tokens)
            for start in self.where[node]:
                if start + n < len(self.context):
                    follow.setdefault(self.context[start + n], []).append(start)
            for token, starts in follow.items():
                child = Node(node.tokens + [token], node.score + float(node.logp[token]), node)
                self.where[child] = starts
                node.open += 1
                self.queue.push(child)
        node.logp = None  # its children hold what they need
        self._release(node)

    def _release(self, node: Node) -> None:
        if node.popped and node.open <= 0 and node.seq is not None and not node.seq.finished:
            node.seq.paused = False
            node.seq.finish("abort")

    def _advance(self, core, req) -> list:
        """Pop while the best item is a complete answer or is expanded; expand the best ones that are not."""
        q = self.queue
        if q.heap:
            node, final = q.top()
            if final:
                self.answer = node
            else:
                picked = [entry[3] for entry in sorted(q.heap)[:EXACT_BATCH] if not entry[2]]
                changed = []
                for node in picked:
                    q.heap.remove(next(e for e in q.heap if e[3] is node))
                    parent = node.parent
                    keep_root(parent.seq)
                    child = fork(core, parent.seq, self.search.name)
                    child.record_logprobs(parent.row, child.commit(node.tokens[-1:]))
                    self.expanding[child] = node
                    parent.open -= 1
                    self._release(parent)
                    changed.append(child)
                heapq.heapify(q.heap)
                return changed
        self.done = True
        finish_all(req)
        return list(req.sequences)

    def outcome(self, req) -> SearchResult:
        if self.answer is None:
            return SearchResult(req.sequences[0].result(), [req.sequences[0].result()])
        n = self.answer
        seq = n.parent.seq
        h = Hypothesis(n.score, n.tokens, seq, "stop", extended_logprobs(seq, n.parent.row, n.tokens[-1]))
        result = hypothesis_result(h)
        return SearchResult(result, [result])
