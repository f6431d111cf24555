"""Prompt encoding: raw strings get the tokenizer's own special tokens, chat prompts exactly one BOS (the template's).

The oracle is transformers: `tokenizer(prompt)["input_ids"]` for raw strings, `apply_chat_template(tokenize=True)` for
chat messages, and `generate(do_sample=False)` on the same folder for the end-to-end check on the real models.
"""
from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.engine import Engine
from decodekit.models.tokenizer import ByteTokenizer, encode_prompt

REAL_MODELS = ["smollm2", "gemma3-270m"]
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """A tiny fast tokenizer whose post-processor prepends <bos>, as Gemma's and Llama's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, "<unk>": 3, "the": 4, "cat": 5, "sat": 6, "on": 7, "mat": 8}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                 unk_token="<unk>")
    hf.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
    return hf


def test_raw_string_gets_the_tokenizers_special_tokens(bos_tokenizer):
    for text in ["the cat sat", "the cat sat on the mat"]:
        expected = bos_tokenizer(text)["input_ids"]
        assert expected[0] == 1  # the oracle does add <bos> here
        assert encode_prompt(bos_tokenizer, text, chat=False) == expected


def test_chat_prompt_has_one_bos(bos_tokenizer):
    messages = [{"role": "user", "content": "the cat"}]
    expected = bos_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert expected == [1, 4, 5]
    assert encode_prompt(bos_tokenizer, messages, chat=True) == expected
    assert encode_prompt(bos_tokenizer, "the cat", chat=True) == expected  # a string becomes one user turn


def test_engine_encodes_raw_prompts_with_bos(bos_tokenizer):
    """The engine's own call site: a raw prompt reaches the model with the BOS transformers would put there."""
    model = decodekit.load("random:tiny-llama", device="cpu").model
    engine = Engine(model, bos_tokenizer)
    assert engine.encode("the cat sat") == [1, 4, 5, 6]
    r = engine.generate("the cat sat", 3, ignore_eos=True)
    assert r.prompt_ids == [1, 4, 5, 6] and r.stats.prompt_tokens == 4


def test_ids_and_messages_pass_through():
    tok = ByteTokenizer()
    assert encode_prompt(tok, [5, 6, 7], chat=False) == [5, 6, 7]
    assert encode_prompt(tok, (5, 6), chat=True) == [5, 6]
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert encode_prompt(tok, messages, chat=False) == tok.encode(text)  # messages always go through the template
    assert encode_prompt(tok, "hi", chat=False) == tok.encode("hi", add_special_tokens=True)


def test_bad_prompts_are_one_line_errors():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match="a prompt must be"):
        encode_prompt(tok, 42, chat=False)
    with pytest.raises(ValueError, match="a prompt must be"):
        encode_prompt(tok, [1, "two"], chat=False)

    class NoTemplate(ByteTokenizer):
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        encode_prompt(NoTemplate(), "hi", chat=True)


# ---- the real models: tokenizers, then greedy output against transformers' generate -------------------------------

@pytest.fixture(scope="module", params=REAL_MODELS)
def real(request):
    from transformers import AutoModelForCausalLM

    engine = decodekit.load(request.param, device="cpu", dtype="float32", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(engine.source_folder), dtype=torch.float32).eval()
    return engine, hf


@pytest.mark.real_model
@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_tokenizers_raw_and_chat(name):
    from transformers import AutoTokenizer

    from decodekit.models.sources import resolve

    tok = AutoTokenizer.from_pretrained(str(resolve(name, progress=False)))
    for text in RAW_PROMPTS:
        assert encode_prompt(tok, text, chat=False) == tok(text)["input_ids"]
    chat = encode_prompt(tok, MESSAGES, chat=True)
    assert chat == tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    assert chat[:2] != [tok.bos_token_id] * 2  # the template's BOS only, none added on top


@pytest.mark.real_model
def test_raw_greedy_equals_transformers(real):
    engine, hf = real
    tok = engine.tokenizer
    for text in RAW_PROMPTS:
        ids = torch.tensor([tok(text)["input_ids"]])  # transformers' default tokenization
        with torch.inference_mode():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=14, do_sample=False,
                              pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        got = engine.generate(text, 14)
        assert got.token_ids == ref[: len(got.token_ids)] and (len(got.token_ids) == 14 or got.finish_reason == "stop")
        assert got.prompt_ids == ids[0].tolist()
