"""Options reach the right place: sampling fields the target, method knobs the drafter, and never both."""
import pytest

import decodekit
from decodekit.cli import main


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("random:tiny-llama", device="cpu")


PROMPT = list(range(3, 30))


def test_a_name_that_is_both_a_sampling_field_and_a_knob_is_rejected(engine):
    with pytest.raises(ValueError, match="both a sampling setting and a knob of method 'draft'"):
        engine.generate(PROMPT, 5, method="draft", model=engine, temperature=0.9)
    with pytest.raises(ValueError, match="unknown option 'num_drafts' for method 'pld'"):
        engine.generate(PROMPT, 5, method="pld", num_drafts=3)
    with pytest.raises(ValueError, match="unknown option 'x' for method 'plain'"):
        engine.generate(PROMPT, 5, x=1)


def test_a_draft_models_own_temperature_leaves_the_targets_sampling_alone(engine):
    """`method_options={"temperature": ...}` reaches the draft model only: the target stays greedy."""
    plain = engine.generate(PROMPT, 30).token_ids
    r = engine.generate(PROMPT, 30, method="draft", method_options={"model": engine, "temperature": 1.5, "seed": 3})
    assert r.token_ids == plain  # greedy target: exact whatever the draft samples
    assert r.stats.tau < 30  # the draft did sample (it does not always match the target's argmax)


def test_the_cli_gives_method_options_to_the_method(capsys):
    code = main(["generate", "--model", "random:tiny-llama", "--device", "cpu", "--prompt", "hello", "--raw",
                 "--max-new-tokens", "6", "--json", "--method", "draft", "-O", "model=random:tiny-llama",
                 "-O", "temperature=1.5"])
    assert code == 0
    greedy = main(["generate", "--model", "random:tiny-llama", "--device", "cpu", "--prompt", "hello", "--raw",
                   "--max-new-tokens", "6", "--json"])
    assert greedy == 0
    out = capsys.readouterr().out.strip().splitlines()
    import json

    assert json.loads(out[0])["token_ids"] == json.loads(out[1])["token_ids"]  # the target stayed greedy
