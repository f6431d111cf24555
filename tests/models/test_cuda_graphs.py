"""CUDA-graph replay equals eager execution (skipped without a GPU; CI has none)."""
import pytest
import torch

import decodekit
from decodekit.engine import Engine

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")]


@pytest.fixture(scope="module", params=["random:tiny-llama", "random:tiny-gemma3"])
def engines(request):
    graphed = decodekit.load(request.param, device="cuda", dtype="float32", cuda_graphs=True)
    eager = Engine(graphed.model.model, graphed.tokenizer)
    return graphed, eager


PROMPT = [5, 6, 7, 8, 9, 10] * 5


@pytest.mark.parametrize("method", ["plain", "pld", "recycling", "lookahead", "suffix", "aded", "layerskip"])
def test_graphed_greedy_equals_eager(engines, method):
    graphed, eager = engines
    a = graphed.generate(PROMPT, 60, method=method, ignore_eos=True)
    b = eager.generate(PROMPT, 60, method=method, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_graphed_step_logits_match_eager(engines):
    graphed, eager = engines
    model = graphed.model
    ids = torch.tensor([PROMPT], device="cuda")
    with torch.inference_mode():
        model.setup_cache(1, 256)
        model.model(ids[:, :-3], torch.arange(27, device="cuda")[None])  # eager prefill
        tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool, device="cuda")
        pos = torch.tensor([[27, 28, 28]], device="cuda")
        got = model(ids[:, -3:], pos, tree_mask=tree)  # a 3-node tree padded to the 4-wide graph
        assert model.cache.length == 30
        model.cache.rollback(27)
        want = model.model(ids[:, -3:], pos, tree_mask=tree)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_sampled_generation_reproducible_under_graphs(engines):
    graphed, _ = engines
    a = graphed.generate(PROMPT, 30, temperature=1.0, seed=3, method="pld").token_ids
    assert a == graphed.generate(PROMPT, 30, temperature=1.0, seed=3, method="pld").token_ids


def test_fused_greedy_chunk_is_used_and_exact(engines):
    graphed, eager = engines
    assert graphed.model.greedy_sizes == (16, 4)
    n = 3 * 16 + 4 + 3  # long fused chunks, a short one, then single steps for the remainder
    a = graphed.generate(PROMPT, n, ignore_eos=True)
    b = eager.generate(PROMPT, n, ignore_eos=True)
    assert a.token_ids == b.token_ids
    assert a.stats.decode_steps == n - 1


def test_compiled_blocks_match_eager():
    graphed = decodekit.load("random:tiny-llama", device="cuda", dtype="float32", compile=True)
    eager = Engine(graphed.model.model, graphed.tokenizer)
    for method in ("plain", "pld"):
        a = graphed.generate(PROMPT, 40, method=method, ignore_eos=True)
        b = eager.generate(PROMPT, 40, method=method, ignore_eos=True)
        assert a.token_ids == b.token_ids, method
