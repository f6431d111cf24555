"""n-sample strategies: arithmetic sampling, best-of-n scorers, MBR, self-consistency, quality reranking."""
import math
from fractions import Fraction

import pytest
import torch
from scipy.stats import chisquare

from decodekit import SamplingConfig

from decodekit.search.arithmetic import ArithmeticCode, lattice
from decodekit.search.best_of_n import self_certainty
from decodekit.search.self_consistency import auto_answer, extractor, vote
from decodekit.search.utilities import UTILITIES, mbr_scores
from search_helpers import engine_of, hf_pair, next_logprobs

PROMPT = [40, 7, 300, 12, 99, 40, 7, 300, 12, 99, 40, 7]


@pytest.fixture(scope="module")
def model():
    return hf_pair("tiny-llama", seed=6, scale=0.05)[1]


@pytest.fixture(scope="module")
def engine(model):
    return engine_of(model)


# ---- arithmetic sampling ----------------------------------------------------------------------------------------
def test_a_code_draws_the_token_whose_interval_holds_it():
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64)
    for code, token, rest in [(0.1, 0, 0.5), (0.2, 2, 0.0), (0.95, 3, 0.25 / 0.3), (0.7, 3, 0.0)]:
        c = ArithmeticCode(Fraction(code))
        assert c.sample(probs) == token
        assert float(c.code) == pytest.approx(rest, abs=1e-12)


def test_codes_of_a_lattice():
    draws = lattice(4, seed=3)
    codes = [draws(i).code for i in range(4)]
    gaps = sorted(float((b - a) % 1) for a, b in zip(codes, codes[1:] + codes[:1]))
    assert gaps == pytest.approx([0.25] * 4)


def test_arithmetic_samples_are_stratified_and_each_follows_its_code(engine, model):
    n = 16
    _, cands = engine.generate(PROMPT, 5, search="arithmetic", n=n, temperature=1.0, seed=11, return_all=True)
    samples = sorted(cands, key=lambda r: r.stats.score)  # any order: the checks below are per sample
    p = next_logprobs(model, [PROMPT])[0].double().exp()
    counts = torch.bincount(torch.tensor([r.token_ids[0] for r in samples]), minlength=p.numel()).double()
    assert torch.all(counts >= torch.floor(n * p) - 1e-9) and torch.all(counts <= torch.ceil(n * p) + 1e-9)
    # Each sample is the output its code decodes to under the model's distribution (recomputed from scratch). Only
    # the first tokens: a code rescaled by p amplifies float rounding of p by 1/p at every step, so a recomputation
    # agrees with the engine's own logits for a few steps, not for ever.
    draws = lattice(n, seed=11)
    expected = []
    for i in range(n):
        code, ids, out = draws(i), list(PROMPT), []
        for _ in range(2):
            tok = code.sample(next_logprobs(model, [ids])[0].exp())
            ids.append(tok)
            out.append(tok)
            if tok == 2:
                break
        expected.append(out)
    assert sorted(r.token_ids[:len(e)] for r, e in zip(sorted(cands, key=lambda r: r.token_ids), sorted(expected))) \
        == sorted(expected)


def test_one_arithmetic_sample_follows_the_model_distribution(engine, model):
    p = next_logprobs(model, [PROMPT])[0].double().exp()
    top = p.topk(5).indices.tolist()
    firsts = [engine.generate(PROMPT, 1, search="arithmetic", n=1, temperature=1.0, seed=s).token_ids[0]
              for s in range(400)]
    observed = [sum(f == t for f in firsts) for t in top] + [sum(f not in top for f in firsts)]
    expected = [400 * float(p[t]) for t in top] + [400 * (1 - float(p[top].sum()))]
    assert chisquare(observed, expected).pvalue > 1e-3


@pytest.fixture(scope="module")
def peaked64():
    """float64 and peaked: a code is rescaled by each token's probability, so float32 rounding, which differs between
    passes of different widths, would decide tokens after a few steps of a flat model."""
    model = hf_pair("tiny-llama", seed=6, scale=0.05)[1]
    with torch.no_grad():
        model.lm_head.weight.mul_(20)
    return engine_of(model.double())


@pytest.mark.parametrize("method,options", [("pld", {}), ("suffix", {}), ("draft", {"num_draft": 3})])
def test_arithmetic_samples_are_the_same_with_a_speculative_method(peaked64, method, options):
    """A draft token is kept when the code draws it: the samples are those drawn without a draft."""
    engine = peaked64
    sampling = SamplingConfig(temperature=1.0, seed=5)
    plain = engine.generate(PROMPT, 24, search="arithmetic", n=6, sampling=sampling, return_all=True)
    if method == "draft":
        options = {**options, "model": engine}
    drafted = engine.generate(PROMPT, 24, search="arithmetic", n=6, sampling=sampling, return_all=True,
                              method=method, **options)
    assert sorted(c.token_ids for c in drafted.candidates) == sorted(c.token_ids for c in plain.candidates)
    assert len({tuple(c.token_ids) for c in plain.candidates}) == 6
    assert max(c.stats.tau for c in drafted.candidates) > 1.0  # drafts were accepted


def test_verifying_a_draft_by_the_samples_own_draws():
    from decodekit.engine.sequence import Sequence
    from decodekit.speculative.base import DraftTree

    class Script:  # draws that return a scripted token per call
        def __init__(self, tokens):
            self.tokens = list(tokens)

        def sample(self, probs):
            return self.tokens.pop(0)

    seq = Sequence.__new__(Sequence)
    tree = DraftTree([5, 6, 7], [0, 1, 0])  # 5 -> 6 under the root, 7 a sibling of 5
    for script, want in [([7, 9], ([3], 9)), ([5, 6, 1], ([1, 2], 1)), ([4], ([], 4)), ([5, 8], ([1], 8))]:
        seq.draws = Script(script)
        assert seq._verify_by_draws(tree, torch.zeros(4, 10)) == want
        assert not seq.draws.tokens  # exactly one draw per position decided


# ---- best-of-n ----------------------------------------------------------------------------------------------------
def recomputed(model, prompt, tokens, stat):
    rows = next_logprobs(model, [prompt + tokens[:i] for i in range(len(tokens))])
    return sum(stat(rows, tokens)) / len(tokens)


def logprob_stat(rows, tokens):
    return rows.gather(1, torch.tensor(tokens)[:, None])[:, 0].tolist()


@pytest.mark.parametrize("scorer,stat", [("self_certainty", self_certainty), ("logprob", logprob_stat)])
@pytest.mark.parametrize("method", ["plain", "pld"])
def test_best_of_n_scores_are_their_definitions(engine, model, scorer, stat, method):
    chosen, cands = engine.generate(PROMPT, 12, search="best_of_n", n=5, scorer=scorer, temperature=0.8, seed=2,
                                    method=method, return_all=True)
    assert len(cands) == 5 and chosen is cands[0]
    for c in cands:
        assert c.stats.score == pytest.approx(recomputed(model, PROMPT, c.token_ids, stat), abs=1e-4)
    assert [c.stats.score for c in cands] == sorted((c.stats.score for c in cands), reverse=True)
    assert len({tuple(c.token_ids) for c in cands}) > 1


def test_self_certainty_is_kl_from_uniform():
    logp = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3]]).log()
    kl = [sum(1 / 3 * math.log((1 / 3) / p) for p in row.exp().tolist()) for row in logp]
    assert self_certainty(logp, [0, 1]) == pytest.approx(kl, abs=1e-6)


def test_n_samples_need_sampling(engine):
    with pytest.raises(ValueError, match="give a temperature > 0"):
        engine.generate(PROMPT, 4, search="best_of_n", n=3, temperature=0.0)
    with pytest.raises(ValueError, match="scorer must be one of"):
        engine.generate(PROMPT, 4, search="best_of_n", scorer="vibes", temperature=1.0)


def test_samples_share_the_prompts_kv(engine):
    engine.generate(PROMPT * 3, 6, search="best_of_n", n=4, temperature=1.0, seed=1)
    alloc = engine.core.pool.allocator
    assert alloc.num_free == alloc.capacity


# ---- MBR, self-consistency, reranking ---------------------------------------------------------------------------
def test_mbr_scores_are_mean_utilities_against_the_others():
    from sacrebleu.metrics import CHRF

    texts = ["the cat sat on the mat", "a cat sat on the mat", "the dog ran away", "the cat sat on a mat"]
    chrf = CHRF()
    want = [sum(chrf.sentence_score(t, [o]).score for o in texts if o is not t) / 3 for t in texts]
    assert mbr_scores(texts, UTILITIES["chrf"]) == pytest.approx(want)
    assert max(range(4), key=lambda i: want[i]) != 2  # the outlier is never the consensus
    assert UTILITIES["rougeL"]("the cat sat", "the cat sat") == pytest.approx(100.0)
    assert UTILITIES["bleu"]("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(100.0)


def test_answers_and_votes():
    assert auto_answer("so 3 + 4 = 7\n#### 7") == "7"
    assert auto_answer("the answer is \\boxed{\\frac{1}{2}} done") == "\\frac{1}{2}"
    assert auto_answer("We get 1,234 apples") == "1234"
    assert extractor(r"answer: (\w+)")("answer: yes ... answer: no") == "no"
    winners, share = vote(["0.5", "3", "\\frac{1}{2}", None, "3.0"])
    assert winners == [0, 2] and share == pytest.approx(2 / 5)  # 0.5 and 1/2 agree (math-verify); 3 == 3.0 too,
    assert vote([None, None]) == ([], 0.0)                      # and the earlier group wins the tie


def test_self_consistency_picks_a_sample_of_the_majority_answer(engine):
    chosen, cands = engine.generate(PROMPT, 8, search="self_consistency", n=6, answer=r"(.)", temperature=1.0,
                                    seed=4, return_all=True)
    winners, share = vote([extractor(r"(.)")(c.text) for c in cands])
    assert chosen.stats.score == pytest.approx(share)
    assert all(c.stats.score == pytest.approx(share) for c in cands[:len(winners)])  # (a byte model's texts: the
    assert all(c.stats.score == 0.0 for c in cands[len(winners):])                     # vote is on a character)


def test_quality_rerank_with_a_metric(engine, model):
    metric = lambda source, hyp: -0.01 * len(hyp)  # noqa: E731  (prefers shorter texts)
    chosen, cands = engine.generate(PROMPT, 10, search="quality_rerank", n=5, features={"logprob": 2.0},
                                    metric=metric, temperature=1.0, seed=8, return_all=True)
    for c in cands:
        want = 2.0 * recomputed(model, PROMPT, c.token_ids, logprob_stat) + metric("", c.text)
        assert c.stats.score == pytest.approx(want, abs=1e-4)
    assert chosen.stats.score == max(c.stats.score for c in cands)
    with pytest.raises(ValueError, match="unknown feature 'comet'"):
        engine.generate(PROMPT, 4, search="quality_rerank", features={"comet": 1.0}, temperature=1.0)
