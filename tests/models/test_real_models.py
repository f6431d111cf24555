"""The native runtime against transformers on the real built-in models (fetched once into ~/.cache/decodekit)."""
import pytest
import torch
from transformers import AutoModelForCausalLM

import decodekit
from decodekit.models.kv_cache import private_pool

pytestmark = pytest.mark.real_model

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences why the sky is blue."]


@pytest.fixture(scope="module")
def smollm2():
    return decodekit.load("smollm2", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def smollm2_hf(smollm2):
    return AutoModelForCausalLM.from_pretrained(str(smollm2.source_folder), dtype=torch.float32).eval()


def tree_of(n_prefix: int):
    parents = [-1, 0, 0, 1, 1, 2]
    anc = torch.zeros(6, 6, dtype=torch.bool)
    depth = [0] * 6
    for i, p in enumerate(parents):
        anc[i, i] = True
        if p >= 0:
            anc[i] |= anc[p]
            depth[i] = depth[p] + 1
    return parents, anc, n_prefix + torch.tensor(depth)


def check_logits(engine, hf, text: str) -> None:
    ids = torch.tensor([engine.encode(text, chat=True)])
    n = ids.shape[1]
    model = engine.model
    _, kv = private_pool(model, n + 16)
    with torch.inference_mode():
        expected = hf(ids).logits[0]
        prefill = model.forward_seq(kv, ids[0, :-1].tolist(), list(range(n - 1)))
        decode = model.forward_seq(kv, ids[0, -1:].tolist(), [n - 1])
        torch.testing.assert_close(prefill, expected[:-1], rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(decode, expected[-1:], rtol=1e-3, atol=1e-3)
        # tree forward: nodes = candidate continuations; each path must match transformers on that path
        parents, anc, positions = tree_of(n)
        nodes = expected[-1].topk(6).indices[None]
        tree_logits = model.forward_seq(kv, nodes[0].tolist(), positions.tolist(), tree=anc)
        for leaf in (3, 5):
            path = [i for i in range(6) if anc[leaf, i]]
            ref = hf(torch.cat([ids, nodes[:, path]], 1)).logits[0, n:]
            torch.testing.assert_close(tree_logits[path], ref, rtol=1e-3, atol=1e-3)


def test_smollm2_logits_match_transformers(smollm2, smollm2_hf):
    check_logits(smollm2, smollm2_hf, PROMPTS[0])


def test_smollm2_greedy_equals_transformers_greedy(smollm2, smollm2_hf):
    for text in PROMPTS:
        ids = torch.tensor([smollm2.encode(text, chat=True)])
        with torch.inference_mode():
            ref = smollm2_hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                                      pad_token_id=smollm2.tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
        got = smollm2.generate(text, 48, chat=True).token_ids
        assert got == ref


def test_smollm2_batch_equals_single(smollm2):
    batch = smollm2.generate(PROMPTS, 24, chat=True)
    assert [r.token_ids for r in batch] == [smollm2.generate(p, 24, chat=True).token_ids for p in PROMPTS]


def test_gemma3_logits_match_transformers():
    engine = decodekit.load("gemma3-270m", device="cpu", dtype="float32")
    hf = AutoModelForCausalLM.from_pretrained(str(engine.source_folder), dtype=torch.float32).eval()
    check_logits(engine, hf, "The three largest cities of Italy are")
