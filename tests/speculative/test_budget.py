"""The cost-aware draft budget: cuts drafts that do not pay, keeps those that do, and cuts trees correctly."""
import torch

from decodekit.speculative.base import DraftTree
from decodekit.speculative.budget import DraftBudget, cut_tree


def test_cut_tree_keeps_shallow_nodes_and_remaps_parents():
    tree = DraftTree([10, 11, 12, 13, 14], [0, 0, 1, 3, 2], torch.eye(5), verify=[True, True, True, True, False])
    cut = cut_tree(tree, 1)
    # depths: 1, 1, 2, 3, 2 -> keep nodes 1, 2 and the ride-along node 5 (whose parent is node 2)
    assert cut.tokens == [10, 11, 14] and cut.parents == [0, 0, 2]
    assert torch.equal(cut.draft_probs, torch.eye(5)[[0, 1, 4]]) and cut.verify == [True, True, False]
    assert cut_tree(tree, 0).tokens == []  # the ride-along node goes with its parent


def simulate(budget: DraftBudget, accept_rate: float, time_of_width, steps: int = 200) -> float:
    """Mean draft depth the budget lets through, for a drafter proposing 8-token chains."""
    g = torch.Generator().manual_seed(0)
    depths = []
    for _ in range(steps):
        tree = budget.trim(DraftTree.chain(list(range(8)))) if budget.should_draft() else DraftTree()
        accepted = 0
        while accepted < len(tree) and torch.rand((), generator=g) < accept_rate:
            accepted += 1
        budget.record(tree, accepted, len(tree) + 1, time_of_width(len(tree) + 1))
        depths.append(len(tree))
    return sum(depths[50:]) / len(depths[50:])


def test_budget_backs_off_when_drafts_miss_and_verify_costs():
    cpu_like = lambda w: 1.0 + 0.1 * (w - 1)  # noqa: E731 - each verified token costs 10% of a step
    assert simulate(DraftBudget(), 0.05, cpu_like) < 1.5


def test_budget_keeps_deep_drafts_when_they_pay():
    gpu_like = lambda w: 1.0 + 0.01 * (w - 1)  # noqa: E731 - wide verify passes are nearly free
    assert simulate(DraftBudget(), 0.9, gpu_like) > 6


def test_budget_stops_asking_the_drafter_and_backs_off_probes():
    budget = DraftBudget()
    slow_draft = lambda w: 1.0 if w == 1 else 5.0  # noqa: E731 - e.g. a drafter running eagerly beside a graph
    simulate(budget, 0.5, slow_draft, steps=300)
    asked = sum(budget.should_draft() for _ in range(100))
    assert asked <= 100 // budget.probe_every and budget.probe_interval > budget.probe_every


def test_quiet_steps_predicts_the_refusals_before_the_next_probe():
    budget = DraftBudget()
    simulate(budget, 0.5, lambda w: 1.0 if w == 1 else 5.0, steps=300)
    while budget.should_draft():  # step to a refusal
        pass
    quiet = budget.quiet_steps()
    assert quiet > 0
    assert [budget.should_draft() for _ in range(quiet + 1)] == [False] * quiet + [True]  # then the probe


def test_a_wider_batch_makes_drafts_dearer_and_the_budget_backs_off():
    """The same drafter and acceptance: alone, verifying 8 tokens costs about a step and deep drafts pay; in a batch
    of 64 every verified token is real work and drafts are cut back."""
    def step_time(batch: int, width: int) -> float:
        return 0.2 + 0.01 * width * batch  # fixed launch cost + compute for every token the pass verifies

    def mean_depth(batch: int) -> float:
        budget = DraftBudget(batch=batch)
        return simulate(budget, 0.6, lambda w: step_time(batch, w))

    alone, crowded = mean_depth(1), mean_depth(64)
    assert alone > 3 and crowded < 1.0 and crowded < alone / 3


def test_in_a_batch_a_row_weighs_the_pass_every_row_pays_for():
    """A latency-bound pass (its time barely depends on width or batch): alone, an 8-token draft accepted at 0.95
    pays; in a batch of 32 the same draft makes the pass 35% slower for all 32 rows to gain ~6 tokens, which loses
    to a plain batch step (measured on an H100 before this rule: PLD at batch 32 ran 4.5x slower than plain)."""
    latency_bound = lambda w: 1.0 + 0.05 * (w - 1)  # noqa: E731
    assert simulate(DraftBudget(batch=1), 0.95, latency_bound) > 6
    crowded = DraftBudget(batch=32)
    assert simulate(crowded, 0.95, latency_bound, steps=400) < 0.5


def test_rows_of_a_batch_probe_as_rarely_as_one_sequence():
    """Each probe widens the whole batch's pass: B rows together probe as often as one sequence alone."""
    def probes(batch: int, steps: int = 1024) -> int:
        budget = DraftBudget(batch=batch, probe_every=8, max_probe_every=8)  # no back-off: a fixed interval
        simulate(budget, 0.0, lambda w: 1.0 if w == 1 else 3.0, steps=64)  # drafts never pay: only probes pass
        count = 0
        for _ in range(steps):
            budget.should_draft()
            count += budget.probing
        return count

    assert probes(1) == 1024 // 8 and probes(32) == 1024 // (8 * 32)


def test_chain_depth_measures_plain_first_then_drafts_what_pays():
    """Fused draft rounds ask `chain_depth` instead of trimming a tree they never show the host: 0 until a plain
    step is measured, then the depth that maximizes tokens per second, 0 again once drafts keep missing."""
    b = DraftBudget(probe_every=1000)
    assert b.chain_depth(8) == 0  # nothing measured: a plain step first
    b.costs.record(1, 1, 1.0)
    assert b.chain_depth(8) == 8  # widths > 1 unmeasured: optimistic
    b.costs.record(1, 16, 1.5)
    for _ in range(30):
        b.record(DraftTree.chain([0] * 8), 8, 9)  # every draft accepted: deep drafts pay
    assert b.chain_depth(8) >= 7  # (7 fits a width-8 pass, interpolated cheaper than width 16)
    for _ in range(30):
        b.record(DraftTree.chain([0] * 8), 0, 9)  # none accepted: a wide pass buys nothing
    assert b.chain_depth(8) == 0


def test_a_sampled_tree_is_cut_by_the_last_sampled_trees_shape_never_its_own():
    """A dynamic sampled tree grows deeper under likely tokens, so its shape past depth 1 tells what it drew; a cut
    chosen from that shape would keep or drop drawn siblings by their values (lossy). Two sampled trees that differ
    only in what grew under their draws get the same cut; the cut follows the previous sampled tree instead."""
    def budget() -> DraftBudget:
        b = DraftBudget(probe_every=1000, accept=[0.9, 0.9, 0.9])
        for width, seconds in [(1, 1.0), (2, 1.05), (4, 2.0), (8, 4.0)]:
            b.costs.record(1, width, seconds)
        return b

    q = torch.full((6, 4), 0.25)
    shallow = DraftTree([1, 2], [0, 0], q[:2])  # two depth-1 siblings, nothing grew under them
    deep = DraftTree([1, 2, 3, 3, 3, 3], [0, 0, 1, 3, 4, 5], q)  # the same siblings; a chain grew under the first
    first = {}
    for name, tree in [("shallow", shallow), ("deep", deep)]:
        b = budget()
        b.should_draft()
        first[name] = b.trim(tree)
        assert first[name] is tree  # no sampled tree before it: nothing drawn-independent to cut by
        b.should_draft()
        first[name + " next"] = b.trim(deep)  # the same next tree, cut by the shape of the tree before
    assert len(first["shallow next"]) < len(first["deep next"])
    # A deterministic draft is a function of the context: cutting it by its own shape is lossless, and done.
    b = budget()
    b.should_draft()
    assert len(b.trim(DraftTree([1, 2, 3, 3, 3, 3], [0, 0, 1, 3, 4, 5]))) < 6
