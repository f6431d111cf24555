"""generation_config.json: its EOS ids stop generation and its sampling values are the defaults, as in transformers.

The built-in models' folders carry a generation_config.json with bos/eos/pad ids only (the GGUF conversion writes
those), so these tests use a tiny folder written here: a random Llama saved with save_pretrained, a word-level
tokenizer, and a generation_config.json with an extra EOS id and sampling values.
"""
from __future__ import annotations

import json

import pytest
import torch

import decodekit
from decodekit.cli import main
from decodekit.models.config import shape
from decodekit.models.loader import generation_config
from decodekit.sampling import SamplingConfig

PROMPT = "t5 t9 t11 t5 t9"
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_p": 0.8}
DEFAULTS = {"temperature": 0.7, "top_k": 50, "top_p": 0.8}  # top_k: transformers' global default when sampling


def write_gen_config(folder, **values) -> None:
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, **values}))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny-gen-config")
    config = shape("tiny-llama")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config.to_hf()))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.dim() == 1 else 0.2)  # peaked enough that sampling and greedy differ
    model.save_pretrained(out)
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, config.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                            pad_token="<pad>").save_pretrained(out)
    write_gen_config(out)  # the config's own ids only: find a token that greedy decoding produces
    greedy = decodekit.load(str(out), device="cpu", progress=False).generate(PROMPT, 12, ignore_eos=True).token_ids
    stop = next(t for t in greedy[4:] if t not in greedy[:4])  # first seen at step 5 or later
    write_gen_config(out, eos_token_id=[2, stop], **SAMPLING)
    return out, greedy, stop


@pytest.fixture(scope="module")
def engine(folder):
    return decodekit.load(str(folder[0]), device="cpu", progress=False)


def test_eos_of_generation_config_stops(folder, engine):
    _, greedy, stop = folder
    assert stop in engine.eos_ids
    r = engine.generate(PROMPT, 12, temperature=0)
    assert r.token_ids == greedy[: greedy.index(stop) + 1] and r.finish_reason == "stop"


def test_sampling_defaults_apply_and_user_values_win(engine):
    assert engine.generation_defaults == DEFAULTS
    greedy = engine.generate(PROMPT, 24, temperature=0, ignore_eos=True).token_ids
    sampled = engine.generate(PROMPT, 24, seed=1, ignore_eos=True).token_ids  # nothing given: the model's defaults
    assert sampled == engine.generate(PROMPT, 24, sampling=SamplingConfig(**DEFAULTS, seed=1), ignore_eos=True).token_ids
    assert sampled != greedy
    # one user value replaces one default; the others stay
    hot = engine.generate(PROMPT, 24, seed=1, top_p=1.0, top_k=0, temperature=1.5, ignore_eos=True).token_ids
    assert hot == engine.generate(PROMPT, 24, sampling=SamplingConfig(temperature=1.5, seed=1), ignore_eos=True).token_ids
    assert hot != sampled
    # an explicit SamplingConfig wins entirely: greedy here
    assert engine.generate(PROMPT, 24, sampling=SamplingConfig(seed=1), ignore_eos=True).token_ids == greedy


def test_cli_passes_only_given_flags(folder, engine, capsys):
    def cli(*flags):
        assert main(["generate", "--model", str(folder[0]), "--device", "cpu", "--prompt", PROMPT, "--raw",
                     "--max-new-tokens", "24", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)["token_ids"]

    sampled = engine.generate(PROMPT, 24, sampling=SamplingConfig(**DEFAULTS, seed=3)).token_ids
    greedy = engine.generate(PROMPT, 24, temperature=0).token_ids
    assert sampled != greedy
    assert cli("--seed", "3") == sampled  # the model's sampling defaults, not greedy
    assert cli("--seed", "3", "--temperature", "0") == greedy


@pytest.mark.parametrize("values, defaults", [
    ({}, {}),
    ({"temperature": 0.6, "top_p": 0.9}, {}),  # no do_sample: transformers decodes greedily
    ({"do_sample": False, "temperature": 0.6, "repetition_penalty": 1.3}, {"repetition_penalty": 1.3}),
    ({"do_sample": True}, {"temperature": 1.0, "top_k": 50}),
    ({"do_sample": True, "top_k": 0, "temperature": 0.6, "min_p": 0.05, "typical_p": 0.9},
     {"temperature": 0.6, "min_p": 0.05, "typical_p": 0.9}),
    ({"do_sample": True, "top_k": 20, "epsilon_cutoff": 3e-4, "eta_cutoff": 1e-3},
     {"temperature": 1.0, "top_k": 20, "epsilon_cutoff": 3e-4, "eta_cutoff": 1e-3}),
])
def test_defaults_follow_transformers_rules(tmp_path, values, defaults):
    write_gen_config(tmp_path, **values)
    assert generation_config(tmp_path) == ([2], defaults)


def test_no_generation_config(tmp_path):
    assert generation_config(tmp_path) == ([], {})


def test_with_defaults():
    merged = SamplingConfig.with_defaults({"temperature": 0.7, "top_p": 0.8, "unknown": 1}, {"top_p": 0.5, "seed": 2})
    assert merged == SamplingConfig(temperature=0.7, top_p=0.5, seed=2)
    assert SamplingConfig.with_defaults({}, {}) == SamplingConfig()
