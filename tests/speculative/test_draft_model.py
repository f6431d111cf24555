"""The draft-model drafter: exact greedy output, draft-cache synchronization, dynamic trees, SpecDec++ stopping,
and lossless stochastic drafting (chain and tree) by a chi-square test on a 6-token model."""
from __future__ import annotations

import copy

import pytest
import torch

import decodekit
from decodekit.sampling import SamplingConfig
from decodekit.speculative.draft_model import DraftModel
from decodekit.models.kv_cache import private_pool
from micro import MICRO_PROMPT, VOCAB, chi_square_p, exact_pair_distribution, micro_engine, micro_model, spawned

PROMPT = list(range(3, 30))


@pytest.fixture(scope="module")
def tiny():
    return decodekit.load("random:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def plain(tiny):
    return tiny.generate(PROMPT, 80).token_ids


@pytest.fixture(scope="module")
def noisy(tiny):
    """A draft that agrees with the target often but not always: the target's weights plus noise."""
    model = copy.deepcopy(tiny.model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.25 * p.std())
    return model


def assert_cache_matches_fresh_prefill(drafter: DraftModel) -> None:
    """The draft cache's committed slots hold exactly what prefilling the same tokens from scratch gives."""
    n = drafter.committed - 1  # the root and beyond may hold drafts
    pool, fresh = private_pool(drafter.net, n + 8)
    with torch.inference_mode():
        drafter.net.forward_seq(fresh, drafter.cached[:n], list(range(n)))
    assert n > 60
    mine, theirs = drafter.cache.slots(0, n), fresh.slots(0, n)
    own = drafter.cache.pool
    torch.testing.assert_close(own.k[:, mine], pool.k[:, theirs], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(own.v[:, mine], pool.v[:, theirs], rtol=1e-4, atol=1e-5)
    assert (own.slot_pos[mine] == torch.arange(n)).all()


def test_target_as_its_own_draft_accepts_every_token(tiny, plain):
    for k in (3, 5):
        out = tiny.generate(PROMPT, 80, method="draft", model=tiny, num_draft=k, adaptive=False)
        assert out.token_ids == plain
        assert out.stats.tau == 79 / -(-79 // (k + 1))  # k + 1 tokens a step; the last draft is cut to fit


def test_draft_cache_stays_in_sync_over_many_steps(tiny, plain, noisy):
    for kw in ({}, {"tree_width": 3, "max_nodes": 10}):
        drafter = DraftModel(model=noisy, num_draft=4, **kw)
        copies = spawned(drafter, keep_state=True)
        out = tiny.generate(PROMPT, 80, method=drafter, adaptive=False)
        assert out.token_ids == plain, kw
        assert 1.3 < out.stats.tau < 4.5, kw  # partly accepted: rollbacks of every length happen
        assert copies[0].cached[:len(PROMPT) + 70] == PROMPT + plain[:70]
        assert_cache_matches_fresh_prefill(copies[0])


def test_a_source_string_loads_once_and_gets_rotary_tables(tiny, plain):
    tiny.__dict__.pop("draft_models", None)
    for _ in range(2):  # seed 0 like the target: the same weights, in a separate model object
        out = tiny.generate(PROMPT, 40, method="draft", model="random:tiny-llama@0", num_draft=4, adaptive=False)
        assert out.token_ids == plain[:40] and out.stats.tau >= 4.5
    assert len(tiny.draft_models) == 1
    other = tiny.generate(PROMPT, 40, method="draft", model="random:tiny-llama@7", adaptive=False)
    assert other.token_ids == plain[:40]  # a useless draft is still exact


def test_dynamic_tree_is_exact_and_branches(tiny, plain, noisy, monkeypatch):
    drafter = DraftModel(model=noisy, tree_width=3, max_nodes=12, num_draft=4)
    trees = []
    original = DraftModel._tree
    monkeypatch.setattr(DraftModel, "_tree", lambda self, *a: trees.append(original(self, *a)) or trees[-1])
    out = tiny.generate(PROMPT, 80, method=drafter, adaptive=False)
    assert out.token_ids == plain
    assert any(not t.is_chain() for t in trees)
    assert all(len(t) <= 12 and max(t.depths()) <= 4 for t in trees)


class TableDraft(DraftModel):
    """A draft whose next-token distribution depends only on the last token (a lookup table)."""

    def __init__(self, table: dict[int, dict[int, float]], **kw) -> None:
        super().__init__(model=None, **kw)
        self.table, self.vocab = table, 8
        self.passes = 0

        class _Cache:
            length = 5

            def rollback(self, n):
                pass

        class _Net:
            device = torch.device("cpu")

        self.cache, self.net = _Cache(), _Net()

    def logits(self, token: int) -> torch.Tensor:
        row = self.table.get(token, {})
        rest = max(1.0 - sum(row.values()), 1e-6) / (self.vocab - len(row))  # the remaining mass, spread
        p = torch.full((self.vocab,), rest)
        for t, v in row.items():
            p[t] = v
        return p.log()

    def _feed(self, tokens, positions, tree_mask=None, last_only=False):
        self.passes += 1
        return torch.stack([self.logits(t) for t in tokens])


def test_tree_grows_best_first_by_path_probability():
    table = {0: {1: 0.6, 2: 0.4}, 1: {3: 0.9, 4: 0.1}, 2: {5: 0.5, 6: 0.5}, 3: {7: 0.2}}
    d = TableDraft(table, tree_width=2, max_nodes=3, num_draft=4)
    tree = d._tree([9, 0], d.logits(0))
    # 1 (0.6), its child 3 (0.54), 2 (0.4); 5 and 6 (0.2) and 7 (0.108) do not fit
    edges = {(tok, tree.tokens[p - 1] if p else 0) for tok, p in zip(tree.tokens, tree.parents)}
    assert edges == {(1, 0), (3, 1), (2, 0)}
    assert [tree.tokens[i - 1] for i in tree.children()[0]] == [1, 2]  # siblings in order of probability
    d = TableDraft(table, tree_width=2, max_nodes=10, num_draft=2)  # depth limit
    tree = d._tree([9, 0], d.logits(0))
    assert max(tree.depths()) == 2 and sorted(tree.tokens) == [1, 2, 3, 4, 5, 6]
    assert d.passes <= 1  # one tree pass after the root's: the cost of a depth-2 chain


def test_specdec_stop_threshold_cuts_drafts():
    table = {0: {1: 0.9}, 1: {2: 0.8}, 2: {3: 0.5}, 3: {4: 0.99}}
    d = TableDraft(table, num_draft=6, stop_threshold=0.6)
    d.shared, d.draw = True, None
    # predicted acceptance = path probability: 1 -> 0.9 (kept), 2 -> 0.72 (kept), 3 -> 0.36 (stop)
    assert d._chain([9, 0], d.logits(0)).tokens == [1, 2]
    d.stop_threshold = 0.0
    assert d._chain([9, 0], d.logits(0)).tokens[:4] == [1, 2, 3, 4]


def test_stop_threshold_drafts_fewer_tokens_through_the_engine(tiny, plain):
    eager = tiny.generate(PROMPT, 60, method="draft", model=tiny, num_draft=5, adaptive=False)
    cautious = tiny.generate(PROMPT, 60, method="draft", model=tiny, num_draft=5, stop_threshold=0.99,
                             adaptive=False)
    assert eager.token_ids == cautious.token_ids == plain[:60]
    assert eager.stats.tau == 59 / 10 and cautious.stats.tau == 59 / 30  # the random model is never 99% sure


# ---- stochastic drafting is lossless ------------------------------------------------------------------------
@pytest.mark.parametrize("knobs", [{"num_draft": 2}, {"tree_width": 3, "max_nodes": 6, "num_draft": 2}],
                         ids=["chain", "tree"])
def test_sampled_drafts_keep_the_target_distribution(knobs):
    target = micro_engine(3, 8.0)
    draft = micro_model(5, 4.0)  # another model: q differs from p, so rejections and residuals matter
    sampling = SamplingConfig(temperature=1.0)
    probs = exact_pair_distribution(target, sampling)
    counts = torch.zeros(VOCAB * VOCAB)
    seen_draft_probs = False
    d = DraftModel(model=draft, temperature=1.0, **knobs)
    copies = spawned(d)
    samples = [target.generate(MICRO_PROMPT, 3, method=d, sampling=SamplingConfig(temperature=1.0, seed=i),
                               adaptive=False).token_ids for i in range(300)]
    for ids in samples:
        counts[ids[1] * VOCAB + ids[2]] += 1
    assert all(c.draw is not None for c in copies)  # every sequence drafted stochastically
    assert chi_square_p(counts, probs) > 1e-3
