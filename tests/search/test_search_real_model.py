"""Search strategies on SmolLM2-135M-Instruct (float32, CPU): contrastive search and DoLa against their definitions
recomputed with transformers, and the n-sample selections on real text."""
import pytest
import torch

import decodekit
from decodekit.search.dola import candidate_layers
from decodekit.search.self_consistency import extractor, vote
from decodekit.search.utilities import UTILITIES, mbr_scores
from test_token_policies import reference_contrastive, reference_dola

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def pair():
    from transformers import AutoModelForCausalLM

    engine = decodekit.load("smollm2", device="cpu", dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(engine.source_folder, dtype=torch.float32).eval()
    return engine, ref


def test_contrastive_search_on_smollm2(pair):
    engine, ref = pair
    prompt = engine.encode("The history of the printing press", chat=False)
    want = reference_contrastive(ref, prompt, 0.6, 4, 10)
    got = engine.generate(prompt, 10, search="contrastive", penalty_alpha=0.6, search_options={"top_k": 4})
    assert got.token_ids == want


def test_dola_on_smollm2(pair):
    engine, ref = pair
    prompt = engine.encode("What is the capital of Australia?", chat=True)
    layers = candidate_layers("high", engine.model.config.num_layers, engine.model.config.tie_word_embeddings)
    want = reference_dola(ref, prompt, layers, 0.1, 8, repetition_penalty=1.2)
    got = engine.generate(prompt, 8, search="dola", dola_layers="high", repetition_penalty=1.2)
    assert got.token_ids == want


def test_mbr_and_self_consistency_on_real_text(pair):
    engine, _ = pair
    prompt = "Write one sentence about the sea."
    chosen, cands = engine.generate(prompt, 24, search="mbr", n=4, temperature=0.9, seed=3, chat=True,
                                    return_all=True)
    texts = [c.text for c in cands]
    assert all(texts) and len(set(texts)) > 1
    want = mbr_scores(texts, UTILITIES["chrf"])
    assert [c.stats.score for c in cands] == pytest.approx(want)
    assert chosen.stats.score == max(want)
    question = "Tom has 3 apples and buys 4 more. How many apples does he have? End with '#### <number>'."
    chosen, cands = engine.generate(question, 64, search="self_consistency", n=5, temperature=0.7, seed=1,
                                    chat=True, return_all=True)
    winners, share = vote([extractor("auto")(c.text) for c in cands])
    assert winners and chosen.stats.score == pytest.approx(share)
    assert extractor("auto")(chosen.text) == extractor("auto")(cands[winners[0]].text)
