"""Layer-skipping self-speculation: exact greedy output with the shared and the own cache, the target's cache left
as found, the initial skipped set, and the SWIFT-style search reacting to acceptance."""
from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.speculative.base import DraftTree
from decodekit.speculative.layerskip import LayerSkip
from decodekit.models.kv_cache import private_pool, SeqKV
from micro import spawned

PROMPT = list(range(3, 30))


@pytest.fixture(scope="module")
def gemma():  # 4 layers: 1 and 2 may be skipped
    return decodekit.load("random:tiny-gemma3", device="cpu")


@pytest.fixture(scope="module")
def plain(gemma):
    return gemma.generate(PROMPT, 80).token_ids


def test_initial_skip_set_spares_first_and_last_layers(gemma):
    d = LayerSkip(skip_ratio=0.5).bind(gemma)
    assert d.skip_layers == {1, 2} and d.order == [2, 1]  # late-middle first
    assert LayerSkip(skip_ratio=0.25).bind(gemma).skip_layers == {2}
    assert LayerSkip(skip_ratio=0.9).bind(gemma).skip_layers == {1, 2}  # never 0 or 3
    assert LayerSkip(skip_layers={1}).bind(gemma).skip_layers == {1}
    with pytest.raises(ValueError, match="first and last"):
        LayerSkip(skip_layers={3}).bind(gemma)
    tiny = decodekit.load("random:tiny-llama", device="cpu")  # 2 layers: nothing may be skipped
    assert LayerSkip(skip_ratio=0.5, adapt=False).bind(tiny).skip_layers == frozenset()


@pytest.mark.parametrize("share_cache", [True, False])
def test_no_skipping_drafts_what_the_target_says(gemma, plain, share_cache):
    """The full model as its own draft: every drafted token is accepted (tau = num_draft + 1)."""
    d = LayerSkip(skip_ratio=0.0, num_draft=4, stop_threshold=0.0, adapt_every=1000, share_cache=share_cache)
    out = gemma.generate(PROMPT, 80, method=d, adaptive=False)
    assert out.token_ids == plain and out.stats.tau == 79 / 16  # 5 tokens a step, the last draft cut to fit


@pytest.mark.parametrize("share_cache,skip", [(True, {1}), (True, {1, 2}), (False, {1})])
def test_skipping_is_exact_over_many_steps(gemma, plain, share_cache, skip):
    d = LayerSkip(skip_layers=skip, num_draft=4, stop_threshold=0.0, adapt=False, share_cache=share_cache)
    out = gemma.generate(PROMPT, 80, method=d, adaptive=False)
    assert out.token_ids == plain
    assert out.stats.decode_steps < 79 or skip == {1, 2}  # one skipped layer: drafts are partly accepted


def test_shared_cache_is_left_as_found(gemma):
    proto = LayerSkip(skip_layers={2}, num_draft=4, stop_threshold=0.0, adapt=False).bind(gemma)
    model = gemma.model
    kv = SeqKV(gemma.core.pool)
    with torch.inference_mode():
        model.forward_seq(kv, PROMPT[:-1], list(range(len(PROMPT) - 1)))
    held = kv.slots(0, kv.length)
    k_before, length = gemma.core.pool.k[:, held].clone(), kv.length
    d = proto.spawn(kv, gemma.make_request(PROMPT, 1).sampling, PROMPT)
    tree = d.propose(PROMPT)
    assert len(tree) == 4 and tree.is_chain()
    assert kv.length == length
    assert torch.equal(gemma.core.pool.k[:, held], k_before)
    assert len(d.propose(PROMPT[:-3])) == 0  # the cache does not hold that context: no draft
    kv.free()


def test_own_cache_matches_a_fresh_prefill(gemma, plain):
    proto = LayerSkip(skip_layers={2}, num_draft=4, stop_threshold=0.0, adapt=False, share_cache=False)
    copies = spawned(proto, keep_state=True)
    assert gemma.generate(PROMPT, 80, method=proto, adaptive=False).token_ids == plain
    d = copies[0]
    n = d.committed - 1
    assert n > 60 and d.cached[:n] == (PROMPT + plain)[:n]
    pool, fresh = private_pool(d.net, n + 8)
    with torch.inference_mode():
        d.net.forward_seq(fresh, d.cached[:n], list(range(n)), skip_layers={2})
    mine, theirs = d.cache.slots(0, n), fresh.slots(0, n)
    for layer in (0, 1, 3):  # layer 2 is skipped: its slots are never written
        torch.testing.assert_close(d.cache.pool.k[layer, mine], pool.k[layer, theirs], rtol=1e-4, atol=1e-5)


def test_collapsing_acceptance_puts_layers_back(gemma, plain):
    fixed = LayerSkip(skip_ratio=0.5, num_draft=4, stop_threshold=0.0, adapt=False)
    adaptive = LayerSkip(skip_ratio=0.5, num_draft=4, stop_threshold=0.0, adapt_every=2, min_accept=0.5,
                         max_accept=1.0)
    out_fixed = gemma.generate(PROMPT, 80, method=fixed, adaptive=False)
    copies = spawned(adaptive)
    out_adaptive = gemma.generate(PROMPT, 80, method=adaptive, adaptive=False)
    assert out_fixed.token_ids == out_adaptive.token_ids == plain
    assert len(copies[0].skip_layers) < len(fixed.skip_layers) == 2
    assert adaptive.scores[frozenset({1, 2})] < 0.5
    assert out_adaptive.stats.tau > out_fixed.stats.tau + 1


def test_perfect_acceptance_skips_more_unless_that_failed(gemma):
    d = LayerSkip(skip_ratio=0.0, num_draft=3, stop_threshold=0.0, adapt_every=2).bind(gemma)
    d.kv = SeqKV(gemma.core.pool)
    d.reset(PROMPT)
    full = DraftTree.chain([5, 6, 7])
    from decodekit.speculative.base import StepResult

    def window(accepted: int) -> None:
        for _ in range(2):
            d.observe(PROMPT, StepResult(full, list(range(1, accepted + 1)), 9, torch.zeros(4, 8)))

    window(3)  # all accepted: skip one more layer, the most redundant (2)
    assert d.skip_layers == {2}
    window(0)  # collapse: put it back
    assert d.skip_layers == frozenset() and d.scores[frozenset({2})] == 0.0
    window(3)  # {2} was measured to fail: do not skip it again
    assert d.skip_layers == frozenset()


def test_stop_threshold_uses_the_next_tokens_confidence(gemma):
    """Random weights are never confident: a threshold drafts one token per step instead of num_draft."""
    eager = gemma.generate(PROMPT, 40, method="layerskip", skip_layers={2}, num_draft=4, stop_threshold=0.0,
                           adapt=False, adaptive=False)
    cautious = gemma.generate(PROMPT, 40, method="layerskip", skip_layers={2}, num_draft=4, stop_threshold=0.01,
                              adapt=False, adaptive=False)
    assert eager.token_ids == cautious.token_ids
    assert cautious.stats.accepted_by_position and len(cautious.stats.accepted_by_position) == 1
    assert len(eager.stats.accepted_by_position) == 4
