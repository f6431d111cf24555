"""The transformers fallback: a family the native runtime lacks runs every method behind the same interface."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from decodekit.engine import Engine
from decodekit.models.hf_fallback import HFModel
from decodekit.models.tokenizer import ByteTokenizer

PROMPT = [5, 6, 7, 8, 9, 10, 11] * 4


@pytest.fixture(scope="module")
def hf_and_engine():
    torch.manual_seed(0)
    config = AutoConfig.for_model("phi3", vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return hf, Engine(HFModel(hf), ByteTokenizer(vocab_size=320), name="tiny-phi3")


def test_fallback_greedy_equals_transformers_generate(hf_and_engine):
    hf, engine = hf_and_engine
    ids = torch.tensor([PROMPT])
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                       do_sample=False, pad_token_id=0)[0, len(PROMPT):].tolist()
    assert engine.generate(PROMPT, 24, ignore_eos=True).token_ids == want


@pytest.mark.parametrize("method", ["pld", "recycling", "suffix"])  # chains and trees: rollback and keep_path
def test_fallback_speculative_greedy_equals_plain(hf_and_engine, method):
    _, engine = hf_and_engine
    plain = engine.generate(PROMPT, 40, ignore_eos=True).token_ids
    spec = engine.generate(PROMPT, 40, method=method, ignore_eos=True, adaptive=False)
    assert spec.token_ids == plain
