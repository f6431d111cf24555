"""One sequence's grammar in the engine: what its step drafts, the masks of its rows, and what it commits.

The engine's `Sequence` holds one `SequenceConstraint` when its request is constrained and calls it at four points
of the step (the one loop; nothing else changes):

- `shape(tree)`, in `plan`, right after the drafter proposed: draft nodes that break the grammar are pruned, so
  the pass never scores them (`prune_tree` keeps a stochastic draft's `draft_probs` consistent: each kept node's
  row becomes its draft distribution conditioned on being allowed, which keeps speculative sampling lossless).
  If the grammar forces tokens (jump-forward) and the draft does not already begin with them, the forced chain is
  the draft instead: a free draft, verified like any other, so the output is what constrained plain decoding
  gives (greedy: token for token; sampled: the same distribution). Where the mask leaves only the forced token,
  verification accepts it with certainty.
- `prepare(tree)`, after the pass was launched and before its logits are read: the masks of the root and of every
  node (each from the matcher state along its path, `tree_bitmask`) are computed on the CPU into a pinned buffer
  and copied to the device asynchronously; on a GPU this overlaps the forward pass.
- `mask(logits, tree)`, where logits become tokens (`first_token`, `verify`): disallowed logits go to -inf on the
  device, before penalties and warpers (a copy: the raw logits stay for logprobs and drafters). With the `awrs`
  sampler a plain sampled step skips the mask and `awrs_sample` checks only the sampled tokens (`awrs.py`).
- `advance(tokens)`, in `commit`: the matcher follows the committed tokens; once the grammar is done (nothing but
  EOS can follow, or EOS was taken) the output ends there ("stop"). Running out of tokens first is "length".
"""
from __future__ import annotations

import time

import torch

from ..speculative.base import DraftTree
from .awrs import AWRS
from .base import Matcher, allocate_bitmask, apply_bitmask_
from .tree import prune_tree, tree_bitmask, tree_masks, walk_tree

SAMPLERS = ("mask", "awrs")
JUMP_FORWARD_MAX = 16  # forced tokens per step at most (the KV room a constrained sequence reserves for them)
AWRS_MAX_REJECTS = 32  # then the full mask (still exact): a model that keeps proposing what the grammar forbids


def starts_with(tree: DraftTree, path: list[int]) -> bool:
    """Whether the tree holds `path` from its root (through verified nodes)."""
    kids, node = tree.children(), 0
    for token in path:
        node = next((c for c in kids[node] if tree.tokens[c - 1] == token), None)
        if node is None:
            return False
    return True


class SequenceConstraint:
    """A sequence's matcher and this step's masks. `awrs`: plain sampled steps use AWRS instead of a mask (the
    caller decides it applies: sampled, and no truncation warper, which would have to see the masked logits)."""

    def __init__(self, matcher: Matcher, device: torch.device, awrs: bool = False) -> None:
        self.matcher, self.device, self.awrs = matcher, device, awrs
        self.pin = device.type == "cuda"
        self.host = allocate_bitmask(1, matcher.vocab_size, pin_memory=self.pin)
        self.masks: torch.Tensor | None = None  # this step's masks on the device, one row per tree row
        self.masks_for: DraftTree | None = None  # the tree they were computed for
        self.sampler = AWRS(weight=False, max_rejects=AWRS_MAX_REJECTS)
        self.time_s = 0.0  # host time spent on the grammar (masks, checks, pruning, jump-forward, advancing)
        self.mask_rows = 0  # next-token masks computed
        self.checks = 0  # single-token checks made by AWRS

    @staticmethod
    def max_draft_tokens() -> int:
        return JUMP_FORWARD_MAX

    # ---- plan ------------------------------------------------------------------------------------------------
    def shape(self, tree: DraftTree, room: int) -> tuple[DraftTree, bool]:
        """This step's draft under the grammar, and whether it is the forced chain (not the drafter's)."""
        t0 = time.perf_counter()
        forced = self.matcher.forced()[:min(JUMP_FORWARD_MAX, room - 1)]
        if len(tree):
            if tree.draft_probs is not None:  # the kept rows are renormalized even when nothing is pruned
                allowed, valid = tree_masks(self.matcher, tree.tokens, tree.parents, tree.verify)
                tree, _ = prune_tree(tree, allowed, valid)
            else:
                valid = walk_tree(self.matcher, tree.tokens, tree.parents, tree.verify)
                if not all(valid):
                    tree, _ = prune_tree(tree, None, valid)
        jump = bool(forced) and not starts_with(tree, forced)
        if jump:
            tree = DraftTree.chain(forced)
        self.time_s += time.perf_counter() - t0
        return tree, jump

    # ---- masks -----------------------------------------------------------------------------------------------
    def uses_awrs(self, tree: DraftTree) -> bool:
        return self.awrs and not len(tree)

    def prepare(self, tree: DraftTree, always: bool = False) -> None:
        """Masks for the root and every node of `tree`, on their way to the device (an AWRS step needs none unless
        `always`)."""
        self.masks, self.masks_for = None, tree
        if self.uses_awrs(tree) and not always:
            return
        t0 = time.perf_counter()
        rows = len(tree) + 1
        if self.host.shape[0] < rows:
            self.host = allocate_bitmask(rows, self.matcher.vocab_size, pin_memory=self.pin)
        out, _ = tree_bitmask(self.matcher, tree.tokens, tree.parents, out=self.host, verify=tree.verify)
        if len(tree):  # (the root's row never is: a sequence ends when its grammar does)
            # Rows of ride-along nodes and rows after the grammar's end are empty: nothing is accepted there, and a
            # token drawn after the end is dropped at commit. Allow everything so the distribution stays defined.
            out[~out.any(-1)] = -1
        self.masks = out.to(self.device, non_blocking=True)
        self.mask_rows += rows
        self.time_s += time.perf_counter() - t0

    def mask(self, logits: torch.Tensor, tree: DraftTree) -> torch.Tensor:
        """`logits` `[len(tree)+1, V]` with disallowed tokens at -inf (float32, a copy)."""
        if self.masks is None or self.masks_for is not tree:
            self.prepare(tree, always=True)
        masked = logits.to(torch.float32, copy=True)
        apply_bitmask_(masked, self.masks[:logits.shape[0]])
        self.masks = self.masks_for = None
        return masked

    def awrs_sample(self, probs: torch.Tensor, generator: torch.Generator | None) -> int | None:
        """AWRS: a token from `probs` `[V]` restricted to what the grammar allows; None if `probs` gives the
        allowed tokens no mass (the caller then masks the logits, which cannot lose them)."""
        t0 = time.perf_counter()
        result = self.sampler.sample(probs, self.matcher, generator)
        self.checks += result.checks
        self.mask_rows += int(result.masked)
        self.time_s += time.perf_counter() - t0
        return result.token

    # ---- commit ----------------------------------------------------------------------------------------------
    def advance(self, tokens: list[int]) -> tuple[list[int], bool]:
        """Follow committed tokens; returns the ones kept (up to where the grammar ends) and whether it ended."""
        t0 = time.perf_counter()
        try:
            for i, token in enumerate(tokens):
                try:
                    self.matcher.advance([token])
                except ValueError as e:  # masks and pruning make this impossible: a bug, not the user's input
                    raise RuntimeError(f"constrained decoding committed token {token}, which the grammar does not "
                                       f"allow: {e}") from None
                if self.matcher.done():
                    return tokens[:i + 1], True
            return tokens, False
        finally:
            self.time_s += time.perf_counter() - t0
