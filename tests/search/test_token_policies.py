"""contrastive, dola and momentum against their definitions, recomputed from scratch with transformers at each step."""
import pytest
import torch
import torch.nn.functional as F

from decodekit.search.dola import candidate_layers, jensen_shannon
from decodekit.search.momentum import RESISTANCE, repetition_length
from search_helpers import engine_of, hf_pair, next_logprobs

PROMPTS = [[40, 7, 300, 12, 99, 40, 7], [5, 6, 7, 8, 9, 10, 11, 12, 13, 5, 6]]


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen3"])
def pair(request):
    return hf_pair(request.param, seed=4, scale=0.06)


@torch.no_grad()
def hf_out(ref, ids):
    return ref(torch.tensor([ids]), output_hidden_states=True)


# ---- contrastive search ---------------------------------------------------------------------------------------
@torch.no_grad()
def reference_contrastive(ref, prompt, alpha, k, new):
    ids, out = list(prompt), []
    for _ in range(new):
        o = hf_out(ref, ids)
        context = o.hidden_states[-1][0]  # the final normed states of every token so far
        top = o.logits[0, -1].float().softmax(-1).topk(k)
        scores = []
        for p, tok in zip(top.values, top.indices.tolist()):
            h = hf_out(ref, ids + [tok]).hidden_states[-1][0, -1]
            scores.append((1 - alpha) * p - alpha * F.cosine_similarity(h[None], context).max())
        best = top.indices[int(torch.stack(scores).argmax())].item()
        ids.append(best)
        out.append(best)
        if best == 2:
            break
    return out


@pytest.mark.parametrize("alpha,k", [(0.6, 4), (0.3, 2), (0.9, 6)])
def test_contrastive_search_equals_its_definition(pair, alpha, k):
    ref, model = pair
    engine = engine_of(model)
    for prompt in PROMPTS:
        want = reference_contrastive(ref, prompt, alpha, k, 10)
        got = engine.generate(prompt, 10, search="contrastive", penalty_alpha=alpha, search_options={"top_k": k})
        assert got.token_ids == want
    alloc = engine.core.pool.allocator
    assert alloc.num_free == alloc.capacity


def test_contrastive_with_no_penalty_is_greedy(pair):
    _, model = pair
    engine = engine_of(model)
    for prompt in PROMPTS:
        got = engine.generate(prompt, 12, search="contrastive", penalty_alpha=0.0)
        assert got.token_ids == engine.generate(prompt, 12).token_ids


def test_top_k_is_ambiguous_as_a_keyword(pair):
    engine = engine_of(pair[1])
    with pytest.raises(ValueError, match="'top_k' is both a knob of search 'contrastive' and a sampling setting"):
        engine.generate(PROMPTS[0], 4, search="contrastive", top_k=3)


# ---- DoLa -------------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference_dola(ref, prompt, layers, relative_top, new, repetition_penalty=1.0):
    ids, out = list(prompt), []
    for _ in range(new):
        o = hf_out(ref, ids)
        logp = o.logits[0, -1].float().log_softmax(-1)
        early = torch.stack([ref.lm_head(ref.model.norm(o.hidden_states[j][0, -1])) for j in layers]).float()
        logq = early.log_softmax(-1)
        jsd = []
        for row in logq:  # Jensen-Shannon divergence, written out
            m = 0.5 * (logp.exp() + row.exp())
            jsd.append(0.5 * (F.kl_div(m.log(), logp, log_target=True, reduction="sum")
                              + F.kl_div(m.log(), row, log_target=True, reduction="sum")))
        premature = logq[int(torch.stack(jsd).argmax())]
        scores = torch.where(logp >= logp.max() + torch.tensor(relative_top).log(), logp - premature, -torch.inf)
        if repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(ids)))
            s = scores[seen]
            scores[seen] = torch.where(s > 0, s / repetition_penalty, s * repetition_penalty)
        best = int(scores.argmax())
        ids.append(best)
        out.append(best)
        if best == 2:
            break
    return out


def test_dola_layer_choice_follows_transformers():
    assert candidate_layers("high", 30, True) == [15, 17, 19, 21, 23, 25, 27, 29]
    assert candidate_layers("low", 30, True) == [2, 4, 6, 8, 10, 12, 14]
    assert candidate_layers("low", 30, False) == [2, 4, 6, 8, 10, 12, 14]  # 0, the embeddings, is no candidate
    assert candidate_layers("high", 48, False) == list(range(28, 48, 2))
    assert candidate_layers([3, 5, 99], 8, False) == [3, 5]
    with pytest.raises(ValueError, match="dola_layers must be"):
        candidate_layers("middle", 8, False)


def test_jensen_shannon_divergence():
    p = torch.tensor([0.5, 0.5, 0.0]).log()
    q = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]).log()
    assert jensen_shannon(p, q).tolist() == pytest.approx([0.0, torch.log(torch.tensor(2.0)).item()], abs=1e-6)


@pytest.fixture(scope="module")
def deep_pair():
    return hf_pair("tiny-gemma3", seed=5, scale=0.08)  # 4 layers: several premature candidates


@pytest.mark.parametrize("layers,relative_top,penalty", [([1], 0.1, 1.0), ([1, 2, 3], 0.3, 1.2), ("high", 0.1, 1.0),
                                                         ("low", 0.05, 1.0)])
def test_dola_equals_its_definition(deep_pair, layers, relative_top, penalty):
    ref, model = deep_pair
    engine = engine_of(model)
    c = model.config
    chosen = candidate_layers(layers, c.num_layers, c.tie_word_embeddings)
    differs = 0
    for prompt in PROMPTS:
        want = reference_dola(ref, prompt, chosen, relative_top, 10, penalty)
        got = engine.generate(prompt, 10, search="dola", dola_layers=layers, relative_top=relative_top,
                              repetition_penalty=penalty)
        assert got.token_ids == want
        differs += want != engine.generate(prompt, 10, repetition_penalty=penalty).token_ids
    assert differs  # the contrast changed what greedy decoding picks


# ---- momentum decoding ------------------------------------------------------------------------------------------
def test_repetition_length():
    ctx = [1, 2, 3, 4, 9, 1, 2, 3]
    assert repetition_length(ctx, 7, 5) == 0  # a new node
    assert repetition_length(ctx, 9, 5) == 1  # seen, but "3 9" never occurred
    assert repetition_length(ctx, 4, 5) == 4  # "1 2 3 4" occurred
    assert repetition_length(ctx, 4, 3) == 3  # capped at max_ngram
    assert repetition_length([5, 5, 5], 5, 5) == 3


def reference_momentum(model, prompt, alpha, width, max_ngram, resistance, new):
    ids, out = list(prompt), []
    for _ in range(new):
        probs = next_logprobs(model, [ids])[0].exp()
        top = probs.topk(width)
        scores = [float(p) - alpha * RESISTANCE[resistance](repetition_length(ids, t, max_ngram))
                  for p, t in zip(top.values, top.indices.tolist())]
        best = top.indices.tolist()[scores.index(max(scores))]
        ids.append(best)
        out.append(best)
        if best == 2:
            break
    return out


@pytest.mark.parametrize("resistance,alpha", [("linear", 0.2), ("ngram_block", 0.2), ("exp", 0.05)])
def test_momentum_equals_its_definition(pair, resistance, alpha):
    _, model = pair
    engine = engine_of(model)
    for prompt in PROMPTS:
        want = reference_momentum(model, prompt, alpha, 5, 5, resistance, 16)
        got = engine.generate(prompt, 16, search="momentum", alpha=alpha, resistance=resistance)
        assert got.token_ids == want


def test_momentum_leaves_the_loops_greedy_decoding_is_stuck_in(pair):
    _, model = pair
    engine = engine_of(model)

    def repeats(tokens, n=5):
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        return len(grams) - len(set(grams))

    looping = 0
    for prompt in PROMPTS + [[7, 8, 9], [100, 200, 300, 400], [33] * 6]:
        greedy = engine.generate(prompt, 60, ignore_eos=True).token_ids
        if repeats(prompt + greedy) <= repeats(prompt):
            continue
        looping += 1
        blocked = engine.generate(prompt, 60, ignore_eos=True, search="momentum", resistance="ngram_block").token_ids
        assert repeats(prompt + blocked) <= repeats(prompt)  # no 5-gram of the output repeats an earlier one
    assert looping  # greedy decoding loops on some of these prompts
