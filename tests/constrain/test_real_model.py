"""The layer end to end on SmolLM2-135M, without the engine: masked greedy decoding with jump-forward (the
engine's own path is tested in test_engine.py)."""
import json

import pytest
import torch

import decodekit
from decodekit.constrain import allocate_bitmask, apply_bitmask_, constraint_spec
from decodekit.models.kv_cache import private_pool

from constrain_helpers import BACKENDS, SMOL_EOS

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("smollm2", device="cpu", progress=False)


def constrained_greedy(engine, matcher, prompt, max_new_tokens):
    """Masked greedy decoding: forced tokens go through the model in one pass (not sampled), others are the
    argmax of the masked logits. Returns (tokens, how many were forced, finish reason)."""
    model = engine.model
    _, kv = private_pool(model, len(prompt) + max_new_tokens + 8)
    row = allocate_bitmask(1, matcher.vocab_size)
    logits = model.forward_seq(kv, prompt, list(range(len(prompt))), logits="last")[-1].float()
    out, n_forced = [], 0
    while len(out) < max_new_tokens:
        forced = matcher.forced()[: max_new_tokens - len(out)]
        if forced:
            new = forced
            n_forced += len(forced)
        else:
            matcher.fill_bitmask(row[0])
            new = [int(apply_bitmask_(logits[None].clone(), row)[0].argmax())]
        matcher.advance(new)
        out += new
        if new[-1] == SMOL_EOS:
            return out, n_forced, "stop"
        logits = model.forward_seq(kv, new, list(range(len(prompt) + len(out) - len(new), len(prompt) + len(out))),
                                   logits="last")[-1].float()
    return out, n_forced, "length"


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_greedy_gives_schema_valid_json(engine, smol, backend):
    matcher = smol[backend].compile(constraint_spec(json_schema=SCHEMA)).matcher()
    prompt = engine.encode("Describe Ann, who is 31, as a JSON object with her name and age.", chat=True)
    tokens, n_forced, finish = constrained_greedy(engine, matcher, prompt, 40)
    assert finish == "stop" and n_forced >= 3  # `{"name":` at least came by jump-forward
    value = json.loads(engine.tokenizer.decode(tokens[:-1]))
    assert set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 12
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 150


def test_a_grammar_the_budget_cannot_finish_ends_by_length(engine, smol):
    """Three tokens cannot finish a 30-letter string: the output stops by length, and the matcher says it is not
    a complete match (the engine must report finish_reason "length", never a match)."""
    matcher = smol["llguidance"].compile(constraint_spec(regex="[a-z]{30}")).matcher()
    tokens, _, finish = constrained_greedy(engine, matcher, engine.encode("Write letters:", chat=True), 3)
    assert finish == "length" and len(tokens) == 3 and not matcher.accepting()
