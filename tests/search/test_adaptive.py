"""adadec, exact_extract and entropy_switch against their definitions on small models."""
import math

import pytest
import torch

from search_helpers import engine_of, hf_pair, next_logprobs, small_vocab_model

EOS = 2


def peaked(seed, mult):
    model = hf_pair("tiny-llama", seed=seed, scale=0.05)[1]
    with torch.no_grad():
        model.lm_head.weight.mul_(mult)
    return model


def entropy(logp):
    return float(-(logp.exp() * logp).sum())


# ---- AdaDec -----------------------------------------------------------------------------------------------------
def reference_adadec(model, prompt, threshold, c, lookahead, new):
    ids, out = list(prompt), []
    while len(out) < new:
        logp = next_logprobs(model, [ids])[0]
        room = new - len(out)
        if entropy(logp) < threshold or room <= 1:
            tok = int(logp.argmax())
        else:
            best = None
            for cand in logp.topk(c).indices.tolist():
                score, seq, n = float(logp[cand]), ids + [cand], 0
                while cand != EOS and n < min(lookahead, room - 1):
                    lp = next_logprobs(model, [seq])[0]
                    t = int(lp.argmax())
                    score, n = score + float(lp[t]), n + 1
                    seq.append(t)
                    if t == EOS:
                        break
                if best is None or score / (n + 1) > best[0]:
                    best = (score / (n + 1), cand)
            tok = best[1]
        ids.append(tok)
        out.append(tok)
        if tok == EOS:
            break
    return out


@pytest.mark.parametrize("threshold,c,lookahead", [(3.0, 3, 4), (2.5, 2, 2), (3.5, 4, 5)])
def test_adadec_equals_its_definition(threshold, c, lookahead):
    model = peaked(7, 25)
    engine = engine_of(model)
    paused = 0
    for prompt in ([40, 7, 300, 12, 99], [5, 6, 7, 8, 9, 10, 11, 12, 13]):
        want = reference_adadec(model, prompt, threshold, c, lookahead, 14)
        got = engine.generate(prompt, 14, search="adadec", entropy_threshold=threshold, num_candidates=c,
                              lookahead_length=lookahead)
        assert got.token_ids == want
        paused += want != engine.generate(prompt, 14).token_ids
    assert paused  # the reranking changed what greedy decoding picks
    alloc = engine.core.pool.allocator
    assert alloc.num_free == alloc.capacity


def test_adadec_with_an_infinite_threshold_is_greedy():
    engine = engine_of(peaked(7, 25))
    prompt = [40, 7, 300, 12, 99]
    assert engine.generate(prompt, 12, search="adadec", entropy_threshold=1e9).token_ids == \
        engine.generate(prompt, 12).token_ids


# ---- exact extraction ---------------------------------------------------------------------------------------------
def all_spans(model, prompt, context, max_len):
    """log p(span + EOS | prompt) of every span of `context` up to `max_len` tokens, from scratch."""
    spans = {tuple(context[i:j]) for i in range(len(context)) for j in range(i + 1, min(len(context), i + max_len) + 1)}
    prefixes = sorted({s[:k] for s in spans for k in range(len(s) + 1)})
    rows = dict(zip(prefixes, next_logprobs(model, [prompt + list(p) for p in prefixes])))
    scores = {}
    for s in spans:
        scores[s] = sum(float(rows[s[:k]][s[k]]) for k in range(len(s))) + float(rows[s][EOS])
    return scores


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_extract_finds_the_most_probable_span(seed):
    model = small_vocab_model(vocab=8, seed=seed, scale=0.5)
    engine = engine_of(model)
    g = torch.Generator().manual_seed(seed)
    context = torch.randint(3, 8, (14,), generator=g).tolist()
    prompt = [1] + context + [0, 3]
    scores = all_spans(model, prompt, context, 6)
    best = max(scores, key=scores.get)
    got = engine.generate(prompt, 8, search="exact_extract", context=context, max_answer_tokens=6)
    assert tuple(got.token_ids[:-1]) == best and got.token_ids[-1] == EOS
    assert got.stats.score == pytest.approx(scores[best], abs=1e-4)
    alloc = engine.core.pool.allocator
    assert alloc.num_free == alloc.capacity


def test_exact_extract_context_as_text():
    model = small_vocab_model(vocab=300, seed=1, scale=0.3)
    engine = engine_of(model)
    got = engine.generate("Q: who? Context: Ada wrote it.", 8, search="exact_extract", context="Ada wrote it.")
    assert got.text in "Ada wrote it." and got.text


# ---- entropy-adaptive switching -------------------------------------------------------------------------------------
def bits(logp):
    return entropy(logp) / math.log(2)


def reference_switch(target, cheap, prompt, threshold, window, new):
    ids, out, h, on_target, held, by = list(prompt), [], [], False, 0, []
    for _ in range(new):
        if not on_target:
            lp = next_logprobs(cheap, [ids])[0]
            h.append(bits(lp))
            if sum(h[-window:]) / len(h[-window:]) > threshold:
                lt = next_logprobs(target, [ids])[0]
                h[-1] = bits(lt)
                tok, on_target, held = int(lt.argmax()), True, 1
                by.append("target")
            else:
                tok = int(lp.argmax())
                by.append("cheap")
        else:
            lt = next_logprobs(target, [ids])[0]
            h.append(bits(lt))
            held += 1
            tok = int(lt.argmax())
            by.append("target")
            if held >= window and sum(h[-window:]) / len(h[-window:]) <= threshold:
                on_target = False
        ids.append(tok)
        out.append(tok)
        if tok == EOS:
            break
    return out, by


@pytest.fixture(scope="module")
def models():
    return peaked(8, 30), peaked(9, 30)


def test_switching_follows_its_definition(models):
    target, cheap = models
    engine, cheap_engine = engine_of(target), engine_of(cheap)
    prompt = [40, 7, 300, 12, 99, 8, 8]
    for threshold, window, chunk in [(3.0, 3, 4), (4.0, 2, 8), (4.0, 4, 1), (5.0, 1, 3)]:
        want, by = reference_switch(target, cheap, prompt, threshold, window, 20)
        assert 3 <= by.count("cheap") <= 17  # both models draw tokens, and hand over more than once
        got = engine.generate(prompt, 20, search="entropy_switch", model=cheap_engine, threshold=threshold,
                              window=window, chunk=chunk)
        assert got.token_ids == want, (threshold, window, chunk, by)


def test_the_extremes_are_the_two_models(models):
    target, cheap = models
    engine, cheap_engine = engine_of(target), engine_of(cheap)
    prompt = [40, 7, 300, 12, 99, 8, 8]
    cheap_only = engine.generate(prompt, 16, search="entropy_switch", model=cheap_engine, threshold=1e9)
    assert cheap_only.token_ids == cheap_engine.generate(prompt, 16).token_ids
    target_only = engine.generate(prompt, 16, search="entropy_switch", model=cheap_engine, threshold=-1.0)
    assert target_only.token_ids == engine.generate(prompt, 16).token_ids


def test_the_cheap_model_can_be_the_target_with_layers_skipped():
    from decodekit.models.kv_cache import private_pool

    target = hf_pair("tiny-gemma3", seed=3, scale=0.08)[1]  # 4 layers: the first and last always run
    engine = engine_of(target)
    prompt = [40, 7, 300, 12, 99, 8, 8]
    got = engine.generate(prompt, 10, search="entropy_switch", threshold=1e9, skip_layers=[1])
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            _, kv = private_pool(target, len(ids) + 1)
            ids.append(int(target.forward_seq(kv, ids, list(range(len(ids))), skip_layers={1})[-1].argmax()))
    assert got.token_ids == ids[len(prompt):]


def test_adadec_when_every_candidate_ends_at_once():
    """Candidates that end the output (or no lookahead at all) are decided without another pass."""
    engine = engine_of(peaked(7, 25))
    prompt = [40, 7, 300, 12, 99]
    want = reference_adadec(engine.model, prompt, 0.0, 3, 0, 6)
    assert engine.generate(prompt, 6, search="adadec", entropy_threshold=0.0, lookahead_length=0).token_ids == want
