"""`beam` against transformers' beam search: the same sequences and scores (float32), then the engine's bookkeeping."""
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import decodekit
from search_helpers import engine_of, hf_pair

CONFIGS = [(4, 1.0, False), (3, 0.5, True), (4, 2.0, "never"), (2, -0.5, False), (5, 1.0, True)]


@pytest.fixture(scope="module")
def pair():
    """Weights small enough that beams differ and large EOS logits, so hypotheses end at different lengths."""
    ref, model = hf_pair("tiny-llama", seed=1, scale=0.04)
    with torch.no_grad():
        ref.lm_head.weight[2] *= 3.0
        model.lm_head.weight.copy_(ref.lm_head.weight)
    return ref, model


def prompts(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 500, (length,), generator=g).tolist() for length in (5, 9, 17)[:n]]


def hf_beams(ref, prompt, k, lp, es, new, **extra):
    out = ref.generate(torch.tensor([prompt]), num_beams=k, length_penalty=lp, early_stopping=es,
                       num_return_sequences=k, output_scores=True, return_dict_in_generate=True, do_sample=False,
                       max_new_tokens=new, eos_token_id=2, pad_token_id=1, **extra)
    seqs = []
    for row in out.sequences[:, len(prompt):].tolist():
        while row and row[-1] == 1:  # padding after a hypothesis that ended early (1 is BOS: never generated here)
            row.pop()
        seqs.append(row[:row.index(2) + 1] if 2 in row else row)
    return seqs, out.sequences_scores.tolist()


def assert_same(cands, seqs, scores):
    assert len(cands) == len(seqs)
    for c, s, score in zip(cands, seqs, scores):
        assert c.token_ids == s
        assert c.stats.score == pytest.approx(score, abs=1e-4)


@pytest.mark.parametrize("k,lp,es", CONFIGS)
def test_same_sequences_and_scores_as_transformers(pair, k, lp, es):
    ref, model = pair
    engine = engine_of(model)
    ends = 0
    for prompt in prompts():
        seqs, scores = hf_beams(ref, prompt, k, lp, es, 12)
        chosen, cands = engine.generate(prompt, 12, search="beam", num_beams=k, length_penalty=lp, early_stopping=es,
                                        return_all=True)
        assert_same(cands, seqs, scores)
        assert chosen.token_ids == seqs[0] and chosen.stats.score == cands[0].stats.score
        ends += sum(c.finish_reason == "stop" for c in cands)
    assert ends  # the case covers hypotheses that end with EOS
    alloc = engine.core.pool.allocator
    assert alloc.num_free == alloc.capacity  # every beam's KV returned


def test_one_beam_is_greedy_decoding(pair):
    ref, model = pair
    engine = engine_of(model)
    for prompt in prompts():
        greedy = engine.generate(prompt, 12)
        beam = engine.generate(prompt, 12, search="beam", num_beams=1, length_penalty=0.0)
        assert beam.token_ids == greedy.token_ids
        logp = torch.tensor(0.0)
        from search_helpers import next_logprobs
        rows = next_logprobs(model, [prompt + greedy.token_ids[:i] for i in range(len(greedy.token_ids))])
        logp = rows.gather(1, torch.tensor(greedy.token_ids)[:, None]).sum()
        assert beam.stats.score == pytest.approx(float(logp), abs=1e-4)  # length_penalty 0: the plain sum


def test_prompts_as_one_batch_equal_each_alone(pair):
    ref, model = pair
    engine = engine_of(model)
    alone = [engine.generate(p, 10, search="beam", num_beams=3) for p in prompts()]
    together = engine.generate(prompts(), 10, search="beam", num_beams=3)
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.stats.score for r in together] == pytest.approx([r.stats.score for r in alone], abs=1e-5)


class StopAt(StoppingCriteria):
    """transformers' side of a stop string on the byte tokenizer: a row whose text contains `stop` is done."""

    def __init__(self, tokenizer, start, stop):
        self.tokenizer, self.start, self.stop = tokenizer, start, stop

    def __call__(self, input_ids, scores, **kwargs):
        return torch.tensor([self.stop in self.tokenizer.decode(row[self.start:].tolist()) for row in input_ids])


def test_a_stop_string_ends_a_hypothesis_as_transformers_stopping_criteria_do():
    ref, model = hf_pair("tiny-llama", seed=3, scale=0.05)  # EOS is rare here: the stop string ends hypotheses
    engine = engine_of(model)
    tried = 0
    for prompt in prompts():
        free = engine.generate(prompt, 12, search="beam", num_beams=3, ignore_eos=True).token_ids
        # A printable ASCII byte the unconstrained best beam produces after a few tokens: a stop string that ends
        # some hypotheses early (multi-byte text is held back differently by a full decode and a stream).
        ascii_ = [t - 3 for t in free[2:] if 35 <= t - 3 < 127]
        if not ascii_:
            continue
        stop = chr(ascii_[0])
        crit = StoppingCriteriaList([StopAt(engine.tokenizer, len(prompt), stop)])
        seqs, scores = hf_beams(ref, prompt, 3, 1.0, False, 12, stopping_criteria=crit)
        chosen, cands = engine.generate(prompt, 12, search="beam", num_beams=3, stop=[stop], return_all=True)
        assert_same(cands, seqs, scores)
        assert stop not in chosen.text
        tried += any(stop in engine.tokenizer.decode(c.token_ids) for c in cands)
    assert tried  # some hypothesis did end at the stop string


def test_options_are_checked():
    engine = decodekit.load("random:tiny-llama", device="cpu")
    with pytest.raises(ValueError, match="num_beam_groups must be an integer >= 1 dividing num_beams"):
        engine.generate([5, 6], 4, search="beam", num_beams=4, num_beam_groups=3, diversity_penalty=1.0)
    with pytest.raises(ValueError, match="early_stopping must be"):
        engine.generate([5, 6], 4, search="beam", early_stopping="sometimes")
    with pytest.raises(ValueError, match="runs without a speculative method"):
        engine.generate([5, 6], 4, search="beam", method="pld")
    with pytest.raises(ValueError, match="unknown option 'beams' for search 'beam'"):
        engine.generate([5, 6], 4, search="beam", search_options={"beams": 2})


@pytest.mark.real_model
def test_smollm2_beams_equal_transformers():
    from transformers import AutoModelForCausalLM

    engine = decodekit.load("smollm2", device="cpu", dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(engine.source_folder, dtype=torch.float32).eval()
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a small robot"]
    for text, (k, lp, es, new) in zip(texts, [(4, 1.0, False, 20), (2, 0.6, True, 16), (3, 1.5, "never", 24)]):
        prompt = engine.encode(text)
        out = ref.generate(torch.tensor([prompt]), num_beams=k, length_penalty=lp, early_stopping=es,
                           num_return_sequences=k, output_scores=True, return_dict_in_generate=True, do_sample=False,
                           max_new_tokens=new, eos_token_id=sorted(engine.eos_ids), pad_token_id=None)
        eos = engine.eos_ids
        seqs = []
        for row in out.sequences[:, len(prompt):].tolist():
            end = next((i for i, t in enumerate(row) if t in eos), None)
            seqs.append(row if end is None else row[:end + 1])
        chosen, cands = engine.generate(prompt, new, search="beam", num_beams=k, length_penalty=lp, early_stopping=es,
                                        return_all=True)
        assert_same(cands, seqs, out.sequences_scores.tolist())
