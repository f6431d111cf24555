"""Best-first growth of a draft tree by cumulative probability (the expansion rule of SuffixDecoding, ADED,
DySpec and Sequoia): repeatedly add the frontier node whose path probability is highest."""
from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable, Iterable

from .base import DraftTree

Expand = Callable[[Any], Iterable[tuple[int, float, Any]]]  # state -> (token, conditional prob, child state)


def best_first_tree(root_state: Any, expand: Expand, max_nodes: int, max_depth: int,
                    min_prob: float = 0.0) -> DraftTree:
    """A tree of at most `max_nodes` nodes, depth <= `max_depth`, each path's probability >= `min_prob`.

    Parents always precede children and siblings come out most probable first, as the verifiers expect.
    """
    tree = DraftTree()
    tie = itertools.count()
    frontier: list[tuple[float, int, int, int, Any, int]] = []

    def push(parent: int, state: Any, path_prob: float, depth: int) -> None:
        if depth >= max_depth:
            return
        for token, prob, child in expand(state):
            p = path_prob * prob
            if p >= min_prob and p > 0:
                heapq.heappush(frontier, (-p, next(tie), parent, token, child, depth + 1))

    push(0, root_state, 1.0, 0)
    seen: set[tuple[int, int]] = set()
    while frontier and len(tree) < max_nodes:
        neg_p, _, parent, token, state, depth = heapq.heappop(frontier)
        if (parent, token) in seen:  # the same token under the same parent: keep the most probable copy only
            continue
        seen.add((parent, token))
        tree.tokens.append(token)
        tree.parents.append(parent)
        push(len(tree), state, -neg_p, depth)
    return tree
