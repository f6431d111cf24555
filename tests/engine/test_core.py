"""The batched core: every sequence of a batch decodes as it would alone, forks share the prompt's KV memory,
memory comes back, a full pool makes requests wait, the context window ends generation cleanly."""
import random

import pytest
import torch

import decodekit
from decodekit.engine import Engine
from decodekit.models.kv_cache import SeqKV
from decodekit.speculative import DRAFTERS
from drafter_options import drafter_options
from engine_helpers import fused_engine

METHODS = sorted(DRAFTERS)


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("random:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def gemma():
    return decodekit.load("random:tiny-gemma3", device="cpu")  # sliding-window layers


def prompts(vocab: int, n: int = 5, seed: int = 0) -> list[list[int]]:
    """Mixed lengths, some with repeats (drafts get accepted), one shorter than a block, one spanning several."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, vocab, (6,), generator=g).tolist()
    out = [motif * 4, torch.randint(3, vocab, (3,), generator=g).tolist(), (motif[:3] + [7, 8]) * 9]
    out += [torch.randint(3, vocab, (int(torch.randint(5, 60, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n - 3)]
    return out


def options(method: str, engine: Engine) -> dict:
    return {"method_options": drafter_options(method, engine)}


@pytest.mark.parametrize("which", ["engine", "gemma"])
def test_batch_of_every_method_equals_each_prompt_alone(which, request):
    eng = request.getfixturevalue(which)
    ps = prompts(eng.model.config.vocab_size)
    for method in METHODS:
        alone = [eng.generate(p, 30, method=method, ignore_eos=True, **options(method, eng)).token_ids for p in ps]
        batch = eng.generate(ps, 30, method=method, ignore_eos=True, **options(method, eng))
        assert [r.token_ids for r in batch] == alone, method


def test_mixed_methods_in_one_batch_through_add_and_step(engine):
    """Requests join while others run (the server's way); each decodes as alone, whatever its neighbours do."""
    ps = prompts(engine.model.config.vocab_size, n=len(METHODS))
    alone = [engine.generate(p, 25, ignore_eos=True).token_ids for p in ps]
    requests = []
    for i, (p, method) in enumerate(zip(ps, METHODS)):
        requests.append(engine.add_request(p, 25, method=method, ignore_eos=True, **options(method, engine)))
        for _ in range(i % 3):  # the earlier ones are already running when this one arrives
            engine.step()
    while not all(r.finished for r in requests):
        engine.step()
    assert [r.sequences[0].output for r in requests] == alone


def test_forks_equal_samples_that_prefilled_the_prompt_themselves(engine):
    p = prompts(engine.model.config.vocab_size)[0]
    for method in ("plain", "pld"):
        forks = engine.generate(p, 20, method=method, n=4, temperature=1.0, top_p=0.9, seed=11)
        alone = [engine.generate(p, 20, method=method, temperature=1.0, top_p=0.9, seed=11 + i) for i in range(4)]
        assert [f.token_ids for f in forks] == [a.token_ids for a in alone], method
        assert len({tuple(f.token_ids) for f in forks}) > 1  # different samples


def test_forks_share_the_prompts_blocks():
    eng = decodekit.load("random:tiny-llama", device="cpu", block_size=4)
    alloc = eng.core.pool.allocator
    p = list(range(3, 3 + 22))  # 5 full blocks and a partial one
    request = eng.add_request(p, 5, n=3, temperature=1.0, ignore_eos=True)
    while not request.sequences or request.sequences[0].kv.length == 0:
        eng.step()
    eng.step()  # the prefill finished last step: the forks exist now
    kvs = [s.kv for s in request.sequences]
    assert len(kvs) == 3
    shared = set(kvs[0].blocks[:5])
    assert all(set(kv.blocks[:5]) == shared for kv in kvs)
    assert all(alloc.refs[b] == 3 for b in shared)
    assert len({kv.blocks[5] for kv in kvs}) == 3  # the partial block was copied, not shared
    while not request.finished:
        eng.step()
    assert alloc.num_free == alloc.capacity


def test_every_block_returns_after_many_requests_of_random_lengths():
    eng = decodekit.load("random:tiny-llama", device="cpu", kv_tokens=4096, block_size=8, max_running=24)
    rng = random.Random(0)
    vocab = eng.model.config.vocab_size
    requests = []
    for i in range(1000):
        p = [rng.randrange(3, vocab) for _ in range(rng.randrange(1, 40))]
        method = rng.choice(["plain", "pld", "suffix", "recycling"])
        requests.append(eng.add_request(p, rng.randrange(1, 12), method=method, n=rng.choice([1, 1, 2]),
                                        temperature=rng.choice([0.0, 1.0]), stop=[rng.choice(["a", "e", "zz"])]))
        if i % 7 == 0:
            eng.step()
        if i % 50 == 1 and not requests[-2].finished:
            eng.core.abort(requests[-2])  # a client that went away
    while eng.core.has_work():
        eng.step()
    alloc = eng.core.pool.allocator
    assert alloc.num_free == alloc.capacity and sum(alloc.refs) == 0
    assert all(r.finished for r in requests)


def test_a_request_that_can_never_fit_fails_at_once():
    eng = decodekit.load("random:tiny-llama", device="cpu", kv_tokens=256)
    with pytest.raises(ValueError, match="more than the whole KV pool"):
        eng.generate(list(range(3, 200)), 100)
    assert not eng.core.has_work()  # nothing was queued


def test_a_full_pool_makes_requests_wait_and_each_still_decodes_as_alone(engine):
    tight = Engine(engine.model, engine.tokenizer, kv_tokens=160, block_size=8)
    ps = prompts(engine.model.config.vocab_size, n=8, seed=3)
    alone = [engine.generate(p, 40, ignore_eos=True, method="pld").token_ids for p in ps]
    results = tight.generate(ps, 40, ignore_eos=True, method="pld")
    assert [r.token_ids for r in results] == alone
    assert sum(r.stats.preemptions for r in results) > 0  # the pool ran dry and sequences were preempted
    alloc = tight.core.pool.allocator
    assert alloc.num_free == alloc.capacity


def test_prefix_caching_prefills_a_seen_prefix_once(engine):
    system = list(range(3, 3 + 64))  # four blocks of 16
    first = engine.generate(system + [100, 101], 8, ignore_eos=True)
    second = engine.generate(system + [200, 201, 202], 8, ignore_eos=True)
    assert first.stats.cached_prompt_tokens == 0 or first.stats.cached_prompt_tokens % 16 == 0
    assert second.stats.cached_prompt_tokens == 64
    fresh = Engine(engine.model, engine.tokenizer, prefix_caching=False)
    assert second.token_ids == fresh.generate(system + [200, 201, 202], 8, ignore_eos=True).token_ids


@pytest.mark.parametrize("method", METHODS)
def test_generation_at_the_context_limit_ends_with_length(method, engine):
    """Full drafts up to the last position: the draft is cut to fit, nothing overflows, finish_reason is length."""
    eng = Engine(engine.model, engine.tokenizer, max_context=64)
    p = prompts(engine.model.config.vocab_size)[2][:50]
    r = eng.generate(p, 100, method=method, adaptive=False, ignore_eos=True, **options(method, eng))
    assert r.finish_reason == "length" and len(p) + len(r.token_ids) == 64
    assert r.token_ids == eng.generate(p, 100, ignore_eos=True).token_ids
    batch = eng.generate([p, p[:40]], 100, method=method, adaptive=False, ignore_eos=True, **options(method, eng))
    assert [len(x.token_ids) for x in batch] == [64 - len(p), 24] and {x.finish_reason for x in batch} == {"length"}
    fused = fused_engine(eng)
    fused.max_context = fused.core.max_context = 64
    assert fused.generate(p, 100, ignore_eos=True).token_ids == r.token_ids


@pytest.mark.parametrize("method", ["suffix", "recycling", "aded"])
def test_drafters_that_learn_keep_learning_across_generations(method):
    """The drafter named by a string is kept per engine and method: a second generation benefits from the first."""
    eng = decodekit.load("random:tiny-llama", device="cpu")
    p = list(range(3, 40))
    first = eng.generate(p, 60, method=method, adaptive=False, ignore_eos=True)
    second = eng.generate(p, 60, method=method, adaptive=False, ignore_eos=True)
    assert second.token_ids == first.token_ids
    assert second.stats.decode_steps < first.stats.decode_steps


def test_sequence_kv_round_trip_through_rollback_and_keep_path(engine):
    kv = SeqKV(engine.core.pool)
    kv.ensure(40)
    kv.length = 30
    kv.keep_path(25, [0, 2, 4])
    assert kv.length == 28
    kv.rollback(20)
    kv.trim()
    assert len(kv.blocks) == 2 and kv.capacity == 32
    kv.free()
    assert kv.blocks == []


@pytest.mark.real_model
def test_real_model_batches_of_every_method_and_mixed_methods_equal_each_prompt_alone():
    """SmolLM2-135M-Instruct, float32: prompts of different lengths decoded alone (plain greedy), then as one batch
    per method, then all methods mixed in one batch: every sequence's tokens are the ones it gets alone."""
    from decodekit.bench.datasets import SAMPLE, load_prompts

    eng = decodekit.load("smollm2", device="cpu", dtype="float32", progress=False)
    texts = [p.prompt for p in load_prompts(str(SAMPLE), 1)][:12:3]  # 4 categories, lengths ~30 to ~400 tokens
    alone = [eng.generate(t, 24, chat=True).token_ids for t in texts]
    for method in METHODS:
        batch = eng.generate(texts, 24, chat=True, method=method, adaptive=False, **options(method, eng))
        assert [r.token_ids for r in batch] == alone, method
    requests = [eng.add_request(texts[i % len(texts)], 24, chat=True, method=m, adaptive=False, **options(m, eng))
                for i, m in enumerate(METHODS)]
    while not all(r.finished for r in requests):
        eng.step()
    assert [r.sequences[0].output for r in requests] == [alone[i % len(texts)] for i in range(len(METHODS))]
