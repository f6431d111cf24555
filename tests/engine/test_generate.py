"""The generation loop: stopping, streaming, batching, seeds, penalties under speculation, stats."""
import copy

import pytest
import torch

import decodekit
from decodekit.engine import Engine
from engine_helpers import fused_engine


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("random:tiny-llama", device="cpu")


PROMPT = [5, 6, 7, 8, 9, 10] * 4


def test_max_new_tokens_is_exact_for_every_method(engine):
    for method in ["plain", "pld", "recycling", "lookahead"]:
        r = engine.generate(PROMPT, 17, method=method, ignore_eos=True)
        assert len(r.token_ids) == 17 and r.finish_reason == "length" and r.stats.generated_tokens == 17


def test_eos_stops_and_is_kept_last(engine):
    full = engine.generate(PROMPT, 30, ignore_eos=True).token_ids
    eos = full[9]
    engine.eos_ids.add(eos)
    try:
        r = engine.generate(PROMPT, 30, method="pld")
    finally:
        engine.eos_ids.discard(eos)
    assert r.token_ids == full[: full.index(eos) + 1] and r.finish_reason == "stop"


def test_stop_string_cuts_text(engine):
    full = engine.generate(PROMPT, 30, ignore_eos=True)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    if not stop.strip():
        pytest.skip("degenerate text")
    r = engine.generate(PROMPT, 30, stop=[stop], ignore_eos=True)
    assert r.finish_reason == "stop" and stop not in r.text and full.text.startswith(r.text)


def test_stream_yields_the_final_text(engine):
    pieces = list(engine.stream("hello", 20, ignore_eos=True))
    assert "".join(pieces) == engine.generate("hello", 20, ignore_eos=True).text


def test_seeded_sampling_is_reproducible(engine):
    a = engine.generate(PROMPT, 20, temperature=1.0, top_p=0.9, seed=7).token_ids
    b = engine.generate(PROMPT, 20, temperature=1.0, top_p=0.9, seed=7).token_ids
    c = engine.generate(PROMPT, 20, temperature=1.0, top_p=0.9, seed=8).token_ids
    assert a == b and a != c


def test_batch_equals_one_by_one(engine):
    prompts = [PROMPT, PROMPT[:7], [3, 4, 5]]
    batch = engine.generate(prompts, 15, ignore_eos=True)
    assert [r.token_ids for r in batch] == [engine.generate(p, 15, ignore_eos=True).token_ids for p in prompts]


@pytest.mark.parametrize("method", ["pld", "suffix", "recycling"])
def test_penalties_see_each_draft_nodes_own_context(engine, method):
    """Greedy with penalties: speculative output equals plain output, so penalties were applied per node."""
    kw = dict(repetition_penalty=1.5, frequency_penalty=0.3, presence_penalty=0.2)
    plain = engine.generate(PROMPT, 40, **kw)
    assert engine.generate(PROMPT, 40, method=method, **kw).token_ids == plain.token_ids
    assert plain.token_ids != engine.generate(PROMPT, 40).token_ids  # the penalties did something


def test_stats_are_consistent(engine):
    """Counts that follow from what happened: the target drafting for itself accepts everything, 4 tokens a step."""
    r = engine.generate(PROMPT, 30, method="draft", model=engine, num_draft=3, ignore_eos=True, adaptive=False)
    s = r.stats
    assert s.prompt_tokens == len(PROMPT) and s.generated_tokens == len(r.token_ids) == 30
    assert s.decode_steps == 8 and s.forward_passes == 9  # 29 tokens after the first: 7 steps of 4, one of 1
    assert s.tau == 29 / 8 and s.accepted_by_position == [1.0, 1.0, 1.0]
    assert 0 < s.time_to_first_token_s < s.total_time_s and s.draft_time_s > 0 and s.verify_time_s > 0
    assert s.tokens_per_s == pytest.approx(29 / (s.total_time_s - s.time_to_first_token_s), rel=0.05)
    # a draft that misses: tau - 1 is the accepted tokens per step, at most the sum of per-depth acceptance rates
    noisy = copy.deepcopy(engine.model)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.3 * p.std())
    s = engine.generate(PROMPT, 40, method="draft", model=noisy, num_draft=4, ignore_eos=True, adaptive=False).stats
    assert s.tau == (40 - 1) / s.decode_steps
    rates = s.accepted_by_position
    assert len(rates) == 4 and 0 < rates[0] < 1 and all(0 <= a <= 1 for a in rates)
    assert 1 < s.tau <= 1 + sum(rates) + 1e-9


def test_chunked_prefill_equals_one_pass_and_long_prompts_work():
    from dataclasses import replace

    from decodekit.models.config import shape
    from decodekit.models.kv_cache import private_pool
    from decodekit.models.loader import build_native
    from decodekit.models.tokenizer import ByteTokenizer

    config = replace(shape("tiny-llama"), max_position_embeddings=40000)
    model = build_native(config, None, torch.device("cpu"), torch.float32, seed=0)
    ids = torch.randint(3, 500, (5000,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        _, kv = private_pool(model, 5100)
        chunked = [model.forward_seq(kv, ids[s:s + 2048], list(range(s, min(s + 2048, 5000))), logits="last")
                   for s in range(0, 5000, 2048)][-1]
        _, kv = private_pool(model, 5100)
        whole = model.forward_seq(kv, ids, list(range(5000)), logits="last")
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)
    engine = Engine(model, ByteTokenizer(vocab_size=512), max_step_tokens=2048)
    long = torch.randint(3, 500, (32768,), generator=torch.Generator().manual_seed(1)).tolist()
    r = engine.generate(long, 2, ignore_eos=True)  # a 32k-token prompt, in 2,048-token chunks
    assert len(r.token_ids) == 2 and r.stats.forward_passes == 16 + 1


@pytest.mark.parametrize("method", ["plain", "pld", "suffix", "aded", "recycling", "lookahead"])
def test_fused_greedy_chunks_are_exact_for_every_drafter(engine, method):
    """Plain decoding and drafters the budget holds back (or that draft nothing) decode in fused chunks; the tokens
    stay plain greedy's."""
    want = engine.generate(PROMPT, 70, ignore_eos=True).token_ids
    fused = fused_engine(engine)
    got = fused.generate(PROMPT, 70, method=method, ignore_eos=True)
    assert got.token_ids == want
    calls = fused.core.runner.chunk_calls
    assert calls, "no fused chunk was used"
    if method == "plain":
        assert calls == [(4, 16), (1, 4)]  # 69 tokens after the first: 4 long chunks back to back, a short one,
        # then a single verified step


def test_a_held_back_drafter_runs_chunks_back_to_back_up_to_its_next_probe(engine):
    from decodekit.speculative.budget import StepCosts

    want = engine.generate(PROMPT, 70, ignore_eos=True).token_ids
    fused = fused_engine(engine)
    # Costs that show drafts losing: the budget refuses until its next probe, 64 steps on.
    fused.core.costs["pld"] = StepCosts(times={(1, 1): 1e-3, (1, 2): 1.0, (1, 4): 1.0, (1, 8): 1.0},
                                        accept=[0.01] * 8)
    fused.core.budget_options = {"probe_every": 64}
    got = fused.generate(PROMPT, 70, method="pld", ignore_eos=True)
    assert got.token_ids == want
    assert fused.core.runner.chunk_calls[0] == (4, 16)


@pytest.mark.parametrize("method", ["plain", "pld"])
def test_logprobs_are_the_models_for_every_committed_token(engine, method):
    from decodekit.models.kv_cache import private_pool

    r = engine.generate(PROMPT, 12, method=method, logprobs=3, ignore_eos=True, adaptive=False)
    assert len(r.logprobs) == len(r.token_ids) == 12
    _, kv = private_pool(engine.model, 64)
    seq = PROMPT + r.token_ids
    with torch.inference_mode():
        want = engine.model.forward_seq(kv, seq, list(range(len(seq)))).float().log_softmax(-1)[len(PROMPT) - 1:-1]
    for i, (lp, top) in enumerate(r.logprobs):
        assert lp == pytest.approx(float(want[i, r.token_ids[i]]), abs=1e-4)
        assert [t for t, _ in top] == want[i].topk(3).indices.tolist()


def test_each_method_and_options_learns_its_own_draft_costs(engine):
    """The draft budget's costs and acceptance are kept per method *and options*: `eagle:draft_vocab=8192` drafts at
    another cost than `eagle`, and inheriting the other's (in a bench, whichever ran first) skewed its tau."""
    engine.core.costs.clear()
    engine.generate(PROMPT, 8, method="pld")
    engine.generate(PROMPT, 8, method="pld", method_options={"num_draft": 4, "max_ngram": 2})
    assert set(engine.core.costs) == {"pld", "pld:max_ngram=2,num_draft=4"}
    assert engine.core.costs["pld"] is not engine.core.costs["pld:max_ngram=2,num_draft=4"]
