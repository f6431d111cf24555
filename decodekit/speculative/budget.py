"""Cost-aware draft depth: a drafter that stops paying off is cut back, whatever the drafter.

Leviathan et al. 2023 (Sec. 3.4) choose the draft length that maximizes expected tokens per unit of time from the
acceptance rate and the cost of a step. Here both are measured online: a per-depth conditional acceptance rate
(an exponential moving average, so it follows the text as it changes) and the wall time of a step by forward-pass
width. Before each step the proposed tree is cut at the depth k that maximizes
    (1 + sum_{i<=k} prod_{j<=i} accept_j) / time(width of the tree cut at k).
On a GPU a wider verify pass costs almost nothing and deep drafts survive; on a CPU, or where a drafter keeps
missing, drafts shrink down to plain decoding, and once no depth pays the drafter is not even asked
(`should_draft`), so its own cost goes too. Step times are kept per batch size (`StepCosts`, shared by the
sequences of a method): in a wide batch verification tokens cost more, and drafts back off. In a batch one row's
draft widens the pass that every row pays for, so a row weighs the whole batch's tokens per second: its own
expected tokens plus one from each other row, over the wider pass's time, against the batch's plain step (as in
batched speculative decoding, BASS, Qian et al. 2024). Every `probe_every` steps the whole tree goes through (in a
batch of B rows each row probes B times less often, so the batch as a whole probes at the single-sequence rate), so
the estimates never go stale; probes that lose to plain steps back off exponentially. Cutting a draft never changes
the output distribution.
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


def width_bucket(width: int) -> int:
    return 1 << (width - 1).bit_length()


@dataclass
class StepCosts:
    """Measured seconds per step by (batch-size bucket, forward-width bucket), shared by every sequence of one method
    on one engine: the cost of verifying is a property of the machine and of how many sequences share the pass (a
    wider batch makes each verified token dearer), not of one prompt. Also keeps the method's last acceptance rates,
    so a new generation starts from what earlier ones measured."""

    decay: float = 0.8
    times: dict[tuple[int, int], float] = field(default_factory=dict)
    accept: list[float] = field(default_factory=list)
    sampled_shape: list[int] | None = None  # forward width at each depth of the method's last sampled tree (`trim`)

    def record(self, batch: int, width: int, seconds: float) -> None:
        key = (width_bucket(batch), width_bucket(width))
        old = self.times.get(key)
        self.times[key] = seconds if old is None else self.decay * old + (1 - self.decay) * seconds

    def known(self, batch: int) -> dict[int, float]:
        """Step time by width bucket at this batch size (the nearest measured batch size if this one is not)."""
        b = width_bucket(batch)
        sizes = {k[0] for k in self.times}
        if not sizes:
            return {}
        near = min(sizes, key=lambda s: (abs(s.bit_length() - b.bit_length()), s))
        return {w: t for (s, w), t in self.times.items() if s == near}


@dataclass
class DraftBudget:
    decay: float = 0.8  # weight of the past in the moving averages
    probe_every: int = 8  # let a full draft through this often, to keep measuring deep acceptance
    max_probe_every: int = 128  # probes that keep losing back off up to this interval
    prior_accept: float = 0.5
    accept: list[float] = field(default_factory=list)  # conditional acceptance rate at depth 1, 2, ...
    costs: StepCosts = field(default_factory=StepCosts)
    batch: int = 1  # sequences in the current pass (set by the engine before each step)
    shared_pass: bool = True  # rows of a batch share one pass padded to its widest row (the GPU's captured passes);
    # False: each row is weighed alone, as if its draft cost nobody else anything
    steps: int = 0
    probe_interval: int = 0  # current interval: probe_every, doubled after each probe that lost to plain
    probing: bool = False  # this step is a probe: the whole draft goes through

    @property
    def step_time(self) -> dict[int, float]:
        return self.costs.known(self.batch)

    def _time(self, width: int) -> float:
        known = sorted(self.step_time.items())
        if not known:
            return 1.0
        b = width_bucket(width)
        if b in self.step_time:
            return self.step_time[b]
        below = [kv for kv in known if kv[0] < b]
        above = [kv for kv in known if kv[0] > b]
        if below and above:  # between two measured widths: linear in width (in a batch, the widest row's width
            (w0, t0), (w1, t1) = below[-1], above[0]  # is what gets measured, so narrow widths may never be)
            return t0 + (t1 - t0) * (b - w0) / (w1 - w0)
        # Past the measured range: assume it costs like the nearest measured width (optimistic, so it gets tried).
        return (below or above)[-1 if below else 0][1]

    def _best_depth(self, width_at: list[int]) -> int:
        """The depth k maximizing expected tokens per second, given the forward width at each depth."""
        while len(self.accept) < len(width_at) - 1:
            self.accept.append(self.prior_accept)
        others = self._others()  # rows that get one token from this pass whatever this row drafts
        best_k, best_rate, expected, reach = 0, (others + 1.0) / self._time(1), 1.0, 1.0
        for k in range(1, len(width_at)):
            reach *= self.accept[k - 1]
            expected += reach
            rate = (others + expected) / self._time(width_at[k])
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def should_draft(self) -> bool:
        """Before drafting: could a draft pay off now? False skips the drafter's own cost (a draft model's passes)
        as well as the verification; the step is a plain one."""
        self.steps += 1
        self.probe_interval = self.probe_interval or self.probe_every
        self.probing = self.steps % self._interval() == 0
        if self.probing or len(self.step_time) < 2:  # widths > 1 not measured yet: be optimistic, try
            return self.probing or 1 in self.step_time
        depth = max(len(self.accept), 1)
        return self._best_depth([1 + k for k in range(depth + 1)]) > 0  # as a chain: the cheapest shape

    def chain_depth(self, max_depth: int) -> int:
        """Before a step that drafts a chain of up to `max_depth` tokens without showing it to the host first (fused
        draft rounds): how deep to draft now, 0 for a plain step (`should_draft`, then `trim`'s choice for a chain)."""
        if not self.should_draft():
            return 0
        if self.probing:
            return max_depth
        if 1 not in self.step_time:
            return 0
        return self._best_depth(list(range(1, max_depth + 2)))

    def quiet_steps(self) -> int:
        """After `should_draft` said no: how many more steps it will also say no to, up to its next probe (what it
        decides from changes only when a draft is recorded). The engine runs them back to back."""
        if len(self.step_time) < 2:  # still measuring, not deciding
            return 0
        return self._interval() - 1 - self.steps % self._interval()

    def _interval(self) -> int:
        """Steps between this row's probes: a probe widens the whole batch's pass, so B rows probe B times less."""
        return self.probe_interval * (max(self.batch, 1) if self.shared_pass else 1)

    def _others(self) -> int:
        return max(self.batch, 1) - 1 if self.shared_pass else 0

    def skip(self, steps: int) -> None:
        """`steps` steps ran without asking `should_draft` (after `quiet_steps`)."""
        self.steps += steps

    def trim(self, tree: DraftTree) -> DraftTree:
        """Cut `tree` to the depth that maximizes expected tokens per second.

        A sampled tree (`draft_probs` set) is cut by the shape of the method's previous sampled tree (this sequence's
        or another's), never its own: past depth 1 its shape depends on the tokens it drew (a dynamic tree grows under
        likely tokens), so a cut chosen from it would keep or drop drawn siblings by their values, and the verifier's
        output would no longer follow the target. A cut decided without this tree's draws keeps, under every node,
        all of its children or none: lossless."""
        if not len(tree):
            return tree
        width_at = self._width_at(tree)
        if tree.draft_probs is not None:
            width_at, self.costs.sampled_shape = self.costs.sampled_shape, width_at
        if self.probing:
            return tree
        if 1 not in self.step_time:  # the plain step is the baseline every draft is weighed against: measure it
            return cut_tree(tree, 0)
        return tree if width_at is None else cut_tree(tree, self._best_depth(width_at))

    def _width_at(self, tree: DraftTree) -> list[int]:
        """The forward width of `tree` cut at depth 0, 1, 2, ... (ride-along nodes go wherever a draft goes)."""
        depths = self._verified_depths(tree)
        ride_along = len(tree) - len(depths)
        return [1] + [1 + ride_along + sum(1 for d in depths if d <= k) for k in range(1, max(depths, default=0) + 1)]

    @staticmethod
    def _verified_depths(tree: DraftTree) -> list[int]:
        depths = tree.depths()[1:]
        return [d for i, d in enumerate(depths) if tree.verify is None or tree.verify[i]]

    def record(self, tree: DraftTree, accepted: int, width: int, seconds: float | None = None) -> None:
        """After a step: how deep the tree went and how many tokens were accepted; with `seconds`, also what a
        step of `width` tokens cost (the engine records a batched step's cost once, in `costs`)."""
        if seconds is not None:
            self.costs.record(self.batch, width, seconds)
        if self.probing and len(tree) and 1 in self.step_time:  # back off from probes that lose to plain steps
            others = self._others()
            lost = (others + accepted + 1) / self._time(width) < (others + 1) / self.step_time[1]
            self.probe_interval = min(2 * self.probe_interval, self.max_probe_every) if lost else self.probe_every
        self.probing = False
        depth = max(self._verified_depths(tree), default=0)
        for d in range(1, min(depth, accepted + 1) + 1):  # depths that were reached, i.e. got a verdict
            while len(self.accept) < d:
                self.accept.append(self.prior_accept)
            hit = 1.0 if accepted >= d else 0.0
            self.accept[d - 1] = self.decay * self.accept[d - 1] + (1 - self.decay) * hit
