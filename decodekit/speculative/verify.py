"""Verifiers: given the target's distribution at every tree node, accept a path and draw the next token.

- `greedy`: follow the child equal to the target's argmax.
- `specinfer`: recursive rejection sampling over siblings (SpecInfer, Miao et al. 2024). On a chain it is exactly
  speculative sampling (Leviathan et al. 2023; Chen et al. 2023): accept x ~ q with prob min(1, p(x)/q(x)), else
  sample from norm(max(p - q, 0)).
- `rsd`: Recursive Speculative Decoding (Jeon et al. 2024): siblings drawn without replacement, so after a
  rejection the draft distribution also drops the rejected token before the next sibling is tried.

Deterministic proposals (q = one-hot) make the rejection rule accept x with probability p(x) and otherwise remove
x from p, which keeps every verifier lossless for n-gram, suffix and recycling drafters too.
"""
from __future__ import annotations

from typing import Callable

import torch

from .base import DraftTree

Verifier = Callable[[DraftTree, torch.Tensor, "torch.Generator | None"], tuple[list[int], int]]


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))


def _uniform(generator: torch.Generator | None, device: torch.device) -> float:
    return float(torch.rand((), generator=generator, device=device))


def verify_greedy(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None = None) -> tuple[list[int], int]:
    """`probs` `[n+1, V]` (one-hot in greedy mode); returns accepted nodes (1-based) and the next token."""
    best = probs.argmax(-1).tolist()
    kids = tree.children()
    accepted, node = [], 0
    while True:
        match = next((c for c in kids[node] if tree.tokens[c - 1] == best[node]), None)
        if match is None:
            return accepted, best[node]
        accepted.append(match)
        node = match


def _verify_recursive(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None,
                      without_replacement: bool) -> tuple[list[int], int]:
    kids = tree.children()
    accepted, node = [], 0
    while True:
        p = probs[node].clone()
        q_left = None
        for child in kids[node]:
            token = tree.tokens[child - 1]
            if tree.draft_probs is None:  # deterministic proposal: q is a point mass on `token`
                q = torch.zeros_like(p)
                q[token] = 1.0
            else:
                q = tree.draft_probs[child - 1].to(p)
                if without_replacement and q_left is not None:
                    q = q_left
            qx, px = float(q[token]), float(p[token])
            if qx > 0 and _uniform(generator, p.device) * qx < px:  # accept with prob min(1, p/q)
                accepted.append(child)
                node = child
                break
            residual = (p - q).clamp_min(0)
            total = float(residual.sum())
            # p == q on its support: the residual is empty and any rejection had probability zero; keep p.
            p = residual / total if total > 0 else p
            if without_replacement and tree.draft_probs is not None:
                q_left = q.clone()
                q_left[token] = 0
                mass = float(q_left.sum())
                q_left = q_left / mass if mass > 0 else q_left
        else:
            return accepted, _sample(p, generator)


def verify_specinfer(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None = None):
    return _verify_recursive(tree, probs, generator, without_replacement=False)


def verify_rsd(tree: DraftTree, probs: torch.Tensor, generator: torch.Generator | None = None):
    return _verify_recursive(tree, probs, generator, without_replacement=True)


VERIFIERS: dict[str, Verifier] = {"greedy": verify_greedy, "specinfer": verify_specinfer, "rsd": verify_rsd,
                                  "speculative": verify_specinfer}


def pick_verifier(name: str | None, greedy: bool, tree: DraftTree | None = None) -> Verifier:
    """Default: greedy under greedy decoding; RSD for trees drafted without replacement; else SpecInfer."""
    if name is None:
        if greedy:
            return verify_greedy
        return verify_rsd if tree is not None and tree.without_replacement else verify_specinfer
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; available: {', '.join(VERIFIERS)}")
    if greedy:
        return verify_greedy  # every rule reduces to argmax matching when the target is a point mass
    return VERIFIERS[name]
