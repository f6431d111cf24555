"""Cost-aware draft depth: a drafter that stops paying off is cut back, whatever the drafter.

Leviathan et al. 2023 (Sec. 3.4) choose the draft length that maximizes expected tokens per unit of time from the
acceptance rate and the cost of a step. Here both are measured online: a per-depth conditional acceptance rate
(an exponential moving average, so it follows the text as it changes) and the wall time of a step by forward-pass
width. Before each step the proposed tree is cut at the depth k that maximizes
    (1 + sum_{i<=k} prod_{j<=i} accept_j) / time(width of the tree cut at k).
On a GPU a wider verify pass costs almost nothing and deep drafts survive; on a CPU, or where a drafter keeps
missing, drafts shrink down to plain decoding. Every `probe_every` steps the whole tree goes through, so the
estimates never go stale. Cutting a draft never changes the output distribution.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .base import DraftTree


def cut_tree(tree: DraftTree, max_depth: int) -> DraftTree:
    """The nodes of `tree` at depth <= max_depth; ride-along nodes (the drafter's business) stay with their parent,
    unless the cut is to depth 0, a plain step."""
    depths = tree.depths()
    kept = {0}
    for i in range(1, len(depths)):
        ride_along = tree.verify is not None and not tree.verify[i - 1] and max_depth > 0
        if tree.parents[i - 1] in kept and (depths[i] <= max_depth or ride_along):
            kept.add(i)
    keep = sorted(kept - {0})
    if len(keep) == len(tree):
        return tree
    new_index = {0: 0, **{old: new for new, old in enumerate(keep, start=1)}}
    return DraftTree(
        tokens=[tree.tokens[i - 1] for i in keep],
        parents=[new_index[tree.parents[i - 1]] for i in keep],
        draft_probs=tree.draft_probs[[i - 1 for i in keep]] if tree.draft_probs is not None else None,
        verify=[tree.verify[i - 1] for i in keep] if tree.verify is not None else None,
        without_replacement=tree.without_replacement,
    )


@dataclass
class DraftBudget:
    decay: float = 0.8  # weight of the past in the moving averages
    probe_every: int = 8  # let a full draft through this often, to keep measuring deep acceptance
    prior_accept: float = 0.5
    accept: list[float] = field(default_factory=list)  # conditional acceptance rate at depth 1, 2, ...
    step_time: dict[int, float] = field(default_factory=dict)  # seconds per step by forward width bucket
    steps: int = 0

    @staticmethod
    def _bucket(width: int) -> int:
        return 1 << (width - 1).bit_length()

    def _time(self, width: int) -> float:
        known = sorted(self.step_time.items())
        if not known:
            return 1.0
        b = self._bucket(width)
        if b in self.step_time:
            return self.step_time[b]
        # Unmeasured width: assume it costs like the nearest measured one (optimistic, so it gets tried).
        return min(known, key=lambda kv: abs(kv[0] - b))[1]

    def trim(self, tree: DraftTree) -> DraftTree:
        self.steps += 1
        if not len(tree) or self.steps % self.probe_every == 0:
            return tree
        if 1 not in self.step_time:  # the plain step is the baseline every draft is weighed against: measure it
            return cut_tree(tree, 0)
        depths = self._verified_depths(tree)
        ride_along = len(tree) - len(depths)
        max_depth = max(depths, default=0)
        while len(self.accept) < max_depth:
            self.accept.append(self.prior_accept)
        width_at = [1] + [1 + ride_along + sum(1 for d in depths if d <= k) for k in range(1, max_depth + 1)]
        best_k, best_rate, expected, reach = 0, 1.0 / self._time(1), 1.0, 1.0
        for k in range(1, max_depth + 1):
            reach *= self.accept[k - 1]
            expected += reach
            rate = expected / self._time(width_at[k])
            if rate > best_rate:
                best_k, best_rate = k, rate
        return cut_tree(tree, best_k)

    @staticmethod
    def _verified_depths(tree: DraftTree) -> list[int]:
        depths = tree.depths()[1:]
        return [d for i, d in enumerate(depths) if tree.verify is None or tree.verify[i]]

    def record(self, tree: DraftTree, accepted: int, width: int, seconds: float) -> None:
        """After a step: how deep the tree went, how many tokens were accepted, and what the step cost."""
        b = self._bucket(width)
        old = self.step_time.get(b)
        self.step_time[b] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds
        depth = max(self._verified_depths(tree), default=0)
        for d in range(1, min(depth, accepted + 1) + 1):  # depths that were reached, i.e. got a verdict
            while len(self.accept) < d:
                self.accept.append(self.prior_accept)
            hit = 1.0 if accepted >= d else 0.0
            self.accept[d - 1] = self.decay * self.accept[d - 1] + (1 - self.decay) * hit
