"""Grammar masks for a draft tree, and pruning the drafts that break the grammar before verification.

Trees follow decodekit's `DraftTree` convention: node i (1-based; 0 is the root, the last committed token) has
parent `parents[i-1]`, and parents precede children. The matcher passed in sits at the state *after* the root, so
row 0 is the mask for the token after the root, and row i the mask for the token after node i. One forked matcher
walks the tree depth-first (advance one token into a child, roll back one on the way out): no re-compilation and
one mask computation per valid node.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable, Sequence

import torch

from ..speculative.base import DraftTree
from .base import Matcher, allocate_bitmask, unpack_bitmask


def _children(parents: Sequence[int]) -> list[list[int]]:
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents, start=1):
        if not 0 <= p < i:
            raise ValueError(f"node {i}'s parent {p} must precede it")
        kids[p].append(i)
    return kids


def _ride_along(parents: Sequence[int], verify: Sequence[bool] | None) -> list[bool]:
    """Nodes that ride along (verify False: the drafter's own business, never accepted) and their descendants."""
    ride = [False] * (len(parents) + 1)
    if verify is not None:
        for i, p in enumerate(parents, start=1):
            ride[i] = not verify[i - 1] or ride[p]
    return ride[1:]


def walk_tree(matcher: Matcher, tokens: Sequence[int], parents: Sequence[int], verify: Sequence[bool] | None = None,
              visit: Callable[[int, Matcher], None] | None = None) -> list[bool]:
    """Depth-first over the tree with one fork of `matcher` (not changed); returns per-node validity.

    A node is valid iff its token is allowed after its parent and its parent is valid (the root is). `visit(node,
    state)` is called for the root (0) and every valid node with the matcher state after it. Ride-along nodes
    (`verify[i-1]` False) and their descendants are valid without a check and never visited: the verifier never
    accepts them, so the grammar has no say over them.
    """
    if len(tokens) != len(parents):
        raise ValueError(f"{len(tokens)} tokens but {len(parents)} parents")
    kids = _children(parents)
    valid = _ride_along(parents, verify)
    work = matcher.fork()
    if visit is not None:
        visit(0, work)
    # Explicit stack: (True, node) advances into it, (False, node) rolls it back on the way out.
    stack: list[tuple[bool, int]] = [(True, c) for c in reversed(kids[0]) if not valid[c - 1]]
    while stack:
        entering, node = stack.pop()
        if not entering:
            work.rollback(1)
            continue
        token = int(tokens[node - 1])
        if not work.allows(token):
            continue  # invalid: its whole subtree stays invalid
        work.advance([token])
        valid[node - 1] = True
        if visit is not None:
            visit(node, work)
        stack.append((False, node))
        stack.extend((True, c) for c in reversed(kids[node]) if not valid[c - 1])
    return valid


def tree_bitmask(matcher: Matcher, tokens: Sequence[int], parents: Sequence[int],
                 out: torch.Tensor | None = None,
                 verify: Sequence[bool] | None = None) -> tuple[torch.Tensor, list[bool]]:
    """Packed masks `[n+1, ceil(V/32)]` int32 (row 0 = root) and per-node validity; `matcher` is not changed.

    A node is valid iff its token is allowed at its parent and its parent is valid (the root is). Rows of invalid
    nodes, and of ride-along nodes (`verify`, see `walk_tree`), are all zero. `out` (e.g. a pinned buffer the
    engine reuses) receives the masks when given.
    """
    n = len(tokens)
    if out is None:
        out = allocate_bitmask(n + 1, matcher.vocab_size)
    elif out.shape[0] < n + 1:
        raise ValueError(f"bitmask buffer has {out.shape[0]} rows, the tree needs {n + 1}")
    else:
        out[: n + 1].zero_()
    valid = walk_tree(matcher, tokens, parents, verify, lambda node, state: state.fill_bitmask(out[node]))
    return out[: n + 1], valid


def tree_masks(matcher: Matcher, tokens: Sequence[int], parents: Sequence[int],
               verify: Sequence[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(allowed [n+1, V] bool, valid [n] bool)`: the mask at the root and at every node, and which nodes are
    valid (see `tree_bitmask`, which gives the packed form the engine copies to the device)."""
    bitmask, valid = tree_bitmask(matcher, tokens, parents, verify=verify)
    return unpack_bitmask(bitmask, matcher.vocab_size), torch.tensor(valid, dtype=torch.bool)


def prune(tokens: Sequence[int], parents: Sequence[int],
          valid: Sequence[bool] | torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """The sub-tree of kept nodes: a node is kept iff it is valid and its parent is kept.

    Returns `(tokens, parents, kept)`: the kept nodes' tokens and parents renumbered (1-based, parents still
    precede children, 0 = root), and `kept[j]` = the old index of new node j+1 (for slicing per-node data).
    """
    valid = [bool(v) for v in valid]
    if len(valid) != len(tokens) or len(parents) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens, {len(parents)} parents and {len(valid)} validity flags")
    new_index = {0: 0}
    new_tokens, new_parents, kept = [], [], []
    for i, (token, parent) in enumerate(zip(tokens, parents), start=1):
        if not 0 <= parent < i:
            raise ValueError(f"node {i}'s parent {parent} must precede it")
        if valid[i - 1] and parent in new_index:
            new_index[i] = len(kept) + 1
            new_tokens.append(int(token))
            new_parents.append(new_index[parent])
            kept.append(i)
    return new_tokens, new_parents, kept


def prune_tree(tree: DraftTree, allowed: torch.Tensor | None,
               valid: Sequence[bool] | torch.Tensor) -> tuple[DraftTree, list[int]]:
    """`prune` on a DraftTree (from `tree_masks`' `allowed` and `valid`); returns the pruned tree and `kept`.

    A stochastic drafter's `draft_probs` rows are masked by their parent's allowed set and renormalized: a kept
    node's token is then exactly a draw from its draft distribution *conditioned on being allowed*, which with
    target distributions masked the same way keeps speculative sampling lossless for the constrained
    distribution (dropping a node without this correction would not be). `allowed` is only read for such trees
    (None will do for deterministic drafts).
    """
    tokens, parents, kept = prune(tree.tokens, tree.parents, valid)
    draft_probs = None
    if tree.draft_probs is not None and kept:
        old_parents = torch.tensor([tree.parents[i - 1] for i in kept])
        original = tree.draft_probs[torch.tensor(kept) - 1]
        rows = original * allowed[old_parents].to(tree.draft_probs.device)
        total = rows.sum(-1, keepdim=True)
        draft_probs = torch.where(total > 0, rows / total.clamp_min(1e-30), original)  # ride-along rows: as drafted
    elif tree.draft_probs is not None:
        draft_probs = tree.draft_probs[:0]
    verify = None if tree.verify is None else [tree.verify[i - 1] for i in kept]
    return replace(tree, tokens=tokens, parents=parents, draft_probs=draft_probs, verify=verify), kept
