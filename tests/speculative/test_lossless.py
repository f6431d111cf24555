"""Every registered drafter is lossless: greedy output equals plain greedy, and sampled outputs follow the target.

The sampled test enumerates the exact distribution of the second and third generated tokens (the first is drawn
from the prefill, before any drafting) on a model with a 6-token vocabulary, and compares it with the empirical
distribution of speculative generations by a chi-square test. A negative control shows the test catches a
verifier that accepts drafts blindly.
"""
from __future__ import annotations

import random

import pytest
import torch
from scipy.stats import chisquare

import decodekit
from decodekit.engine import Engine
from decodekit.sampling import SamplingConfig
from decodekit.speculative import DRAFTERS, verify as verify_module
from decodekit.speculative.budget import DraftBudget, StepCosts
from drafter_options import drafter_options as method_options
from micro import MICRO_PROMPT, VOCAB, chi_square_p, exact_pair_distribution, micro_engine, micro_model

METHODS = sorted(m for m in DRAFTERS if m != "plain")


@pytest.fixture(scope="module")
def tiny():
    return decodekit.load("random:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def tiny_gemma():
    return decodekit.load("random:tiny-gemma3", device="cpu")


@pytest.fixture(scope="module")
def tiny_graphs(tiny):
    """The graph runner's static passes (on the CPU a replay calls the captured function): fused greedy chunks,
    captured verify passes with features, the heads' captured draft passes."""
    return Engine(tiny.model, tiny.tokenizer, cuda_graphs=True)


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    motif = torch.randint(3, vocab, (6,), generator=g).tolist()
    return [motif * 4, torch.randint(3, vocab, (30,), generator=g).tolist(), (motif[:3] + [7, 8]) * 5]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["tiny", "tiny_gemma", "tiny_graphs"])
def test_greedy_identical_to_plain(method, which, request):
    engine = request.getfixturevalue(which)
    for p in prompts(engine.model.config.vocab_size):
        plain = engine.generate(p, 48)
        spec = engine.generate(p, 48, method=method, **method_options(method, engine))
        assert spec.token_ids == plain.token_ids, method
        assert spec.stats.decode_steps <= plain.stats.decode_steps


@pytest.fixture(scope="module")
def micro():
    return micro_engine()


def empirical_pairs(engine: Engine, method: str, sampling: SamplingConfig, n: int, seed: int | None = 1000,
                    **options) -> torch.Tensor:
    """Counts of (second, third) generated token over `n` samples of one request, decoded as one batch: sample i
    is seeded `seed + i` (what it would get alone), or unseeded (`seed=None`: the draft budget is then on)."""
    counts = torch.zeros(VOCAB * VOCAB)
    s = SamplingConfig(**{**sampling.__dict__, "seed": seed})
    for r in engine.generate(MICRO_PROMPT, 3, method=method, sampling=s, n=n, **options):
        counts[r.token_ids[1] * VOCAB + r.token_ids[2]] += 1
    return counts


SETTINGS = [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9),
            SamplingConfig(temperature=1.5, top_k=4)]


@pytest.mark.parametrize("method", METHODS)
def test_sampled_distribution_matches_target(method, micro):
    sampling = SETTINGS[METHODS.index(method) % len(SETTINGS)]  # spread the settings over the methods
    probs = exact_pair_distribution(micro, sampling)
    counts = empirical_pairs(micro, method, sampling, 1200, **method_options(method, micro))
    assert chi_square_p(counts, probs) > 1e-3


@pytest.mark.parametrize("method", ["eagle", "medusa", "hydra"])
def test_sampled_heads_through_the_graph_runner_match_target(method, micro):
    """The heads' captured draft passes and the verify passes that return features, sampled (batches of 128 rows:
    inside the captured batch buckets)."""
    graphed = Engine(micro.model, micro.tokenizer, name="micro", cuda_graphs=True, max_running=128)
    sampling = SETTINGS[METHODS.index(method) % len(SETTINGS)]
    probs = exact_pair_distribution(graphed, sampling)
    counts = empirical_pairs(graphed, method, sampling, 1200, **method_options(method, graphed))
    assert chi_square_p(counts, probs) > 1e-3
    assert any(key[4] for key in graphed.core.runner.passes)


@pytest.mark.parametrize("sampling", SETTINGS, ids=["t1", "t0.7-p0.9", "t1.5-k4"])
def test_sampled_distribution_several_settings(sampling, micro):
    probs = exact_pair_distribution(micro, sampling)
    counts = empirical_pairs(micro, "pld", sampling, 1200, num_draft=3)
    assert chi_square_p(counts, probs) > 1e-3


class FrozenCosts(StepCosts):
    """Step costs that make deep drafts lose (a verified token costs half a step): the budget cuts most trees to
    depth 1, and lets a whole tree through on its probes. Frozen, so the test decides what the budget sees."""

    def __init__(self) -> None:
        super().__init__(times={(1, 1): 1.0, (1, 2): 1.05, (1, 4): 2.0, (1, 8): 4.0, (1, 16): 8.0},
                         accept=[0.9] * 8)

    def record(self, batch, width, seconds):
        pass


class AllFrozen(dict):
    """The core's cost table, handing FrozenCosts to whatever method and options ask."""

    def setdefault(self, key, default=None):
        return super().setdefault(key, FrozenCosts())


@pytest.mark.parametrize("method", ["pld", "draft"])
def test_unseeded_sampling_with_the_budget_cutting_trees_keeps_the_distribution(method, micro, monkeypatch):
    """The default sampled path: no seed, so the draft budget is on and cuts stochastic trees (draft) and
    deterministic chains (pld) differently from step to step; the output still follows the target. (The entropy
    unseeded sequences draw their seeds from is itself seeded here, so that the test is reproducible.)"""
    entropy = random.Random(method)
    monkeypatch.setattr("decodekit.engine.sequence.os.urandom", entropy.randbytes)
    sampling = SamplingConfig(temperature=1.0)
    probs = exact_pair_distribution(micro, sampling)
    micro.core.costs = AllFrozen()
    # The first step is cut, the second a probe: both get tested. The samples run as one batch of 1500 rows; weighed
    # as rows of one shared pass they would never draft (tests/speculative/test_budget.py covers that rule).
    micro.core.budget_options = {"probe_every": 2, "shared_pass": False}
    knobs = {"model": micro_model(5, 4.0), "tree_width": 3, "max_nodes": 6, "num_draft": 3} if method == "draft" \
        else {"num_draft": 3}
    cut = []
    original = DraftBudget.trim
    DraftBudget.trim = lambda self, tree: cut.append((len(tree), len(t := original(self, tree)))) or t
    try:
        counts = empirical_pairs(micro, method, sampling, 1500, seed=None, method_options=knobs)
    finally:
        DraftBudget.trim = original
        micro.core.costs = {}
        micro.core.budget_options = {}
    assert any(after < before for before, after in cut)  # the budget did cut
    assert any(after == before > 1 for before, after in cut)  # and let whole trees through (probes)
    assert chi_square_p(counts, probs) > 1e-3


def test_chi_square_catches_a_lossy_verifier(micro, monkeypatch):
    """Negative control: accepting every draft token changes the distribution, and the test sees it."""
    def accept_all(tree, probs, generator=None):
        kids, node, path = tree.children(), 0, []
        while kids[node]:
            node = kids[node][0]
            path.append(node)
        return path, int(torch.multinomial(probs[node], 1, generator=generator))

    monkeypatch.setattr(verify_module, "pick_verifier", lambda *a, **k: accept_all)
    monkeypatch.setattr("decodekit.engine.sequence.pick_verifier", lambda *a, **k: accept_all)
    sampling = SamplingConfig(temperature=1.0)
    probs = exact_pair_distribution(micro, sampling)
    counts = empirical_pairs(micro, "pld", sampling, 1200, num_draft=3)
    assert chi_square_p(counts, probs) < 1e-3


# ---- verifiers on synthetic distributions, many samples --------------------------------------------------------
def _tree_outcome_distribution(verify, tree, probs, n):
    g = torch.Generator().manual_seed(0)
    counts = {}
    for _ in range(n):
        accepted, nxt = verify(tree, probs, g)
        seq = tuple(tree.tokens[i - 1] for i in accepted) + (nxt,)
        counts[seq[0]] = counts.get(seq[0], 0) + 1
    return counts


@pytest.mark.parametrize("name", ["specinfer", "rsd"])
def test_verifier_first_token_follows_target_with_stochastic_tree(name):
    """Root with 3 sampled children (iid for SpecInfer, without replacement for RSD): first token ~ p."""
    from decodekit.speculative.base import DraftTree

    g = torch.Generator().manual_seed(1)
    v = 5
    p_root = torch.softmax(torch.randn(v, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(v, generator=g) * 2, -1)
    verify = verify_module.VERIFIERS[name]
    counts = torch.zeros(v)
    for i in range(6000):
        if name == "rsd":  # Gumbel-top-k: 3 distinct tokens without replacement
            gumbel = -torch.log(-torch.log(torch.rand(v, generator=g)))
            kids = (q.log() + gumbel).topk(3).indices.tolist()
        else:
            kids = torch.multinomial(q, 3, replacement=True, generator=g).tolist()
        tree = DraftTree(kids, [0, 0, 0], q.expand(3, v).clone(), without_replacement=name == "rsd")
        probs = torch.cat([p_root[None], torch.full((3, v), 1.0 / v)])
        accepted, nxt = verify(tree, probs, g)
        first = tree.tokens[accepted[0] - 1] if accepted else nxt
        counts[first] += 1
    assert chisquare(counts.numpy(), (p_root * counts.sum()).numpy()).pvalue > 1e-3


def test_chain_speculative_sampling_is_lossless_for_two_tokens():
    from decodekit.speculative.base import DraftTree

    g = torch.Generator().manual_seed(2)
    v = 4
    p = torch.softmax(torch.randn(3, v, generator=g) * 1.5, -1)  # p at root, node 1, node 2
    q = torch.softmax(torch.randn(2, v, generator=g) * 1.5, -1)
    counts = torch.zeros(v, v)
    for _ in range(8000):
        a = int(torch.multinomial(q[0], 1, generator=g))
        b = int(torch.multinomial(q[1], 1, generator=g))
        # target's second-token distribution must not depend on which path the verifier took: use p[1] for both
        tree = DraftTree.chain([a, b], q)
        accepted, nxt = verify_module.verify_specinfer(tree, torch.stack([p[0], p[1], p[2]]), g)
        seq = [tree.tokens[i - 1] for i in accepted] + [nxt]
        if len(seq) >= 2:
            counts[seq[0], seq[1]] += 1
        else:  # rejected at the first token: the second comes from the next step, i.e. from p[1]
            counts[seq[0], int(torch.multinomial(p[1], 1, generator=g))] += 1
    expected = (p[0][:, None] * p[1][None, :]).flatten() * counts.sum()
    assert chisquare(counts.flatten().numpy(), expected.numpy()).pvalue > 1e-3


@pytest.mark.real_model
def test_every_drafter_greedy_identical_on_the_real_model():
    """SmolLM2-135M-Instruct in float32, Spec-Bench prompts of six categories, full drafts (no budget cuts)."""
    from decodekit.bench.datasets import SAMPLE, load_prompts

    engine = decodekit.load("smollm2", device="cpu", dtype="float32", progress=False)
    prompts = [p for p in load_prompts(str(SAMPLE), 1)][:6]
    plain = [engine.generate(p.prompt, 32, chat=True).token_ids for p in prompts]
    for method in METHODS:
        for p, want in zip(prompts, plain):
            got = engine.generate(p.prompt, 32, chat=True, method=method, adaptive=False,
                                  **method_options(method, engine))
            assert got.token_ids == want, (method, p.category)
    # Prompt lookup drafting, verifying and committing on the device (fused draft rounds of the graph runner; on the
    # CPU a replay calls the captured function)
    graphed = Engine(engine.model, engine.tokenizer, cuda_graphs=True)
    for p, want in zip(prompts, plain):
        assert graphed.generate(p.prompt, 32, chat=True, method="pld", adaptive=False).token_ids == want, p.category
    assert graphed.core.runner.round_passes
