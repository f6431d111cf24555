"""generate(..., search=NAME): options routing, batches, results, errors; the CLI's --search and -S."""
import json

import pytest

import decodekit
from decodekit import SamplingConfig
from decodekit.cli import main
from decodekit.search import SEARCHES, SearchResult
from search_helpers import engine_of, hf_pair

PROMPTS = [[40, 7, 300, 12, 99], [5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def engine():
    return engine_of(hf_pair("tiny-llama", seed=2, scale=0.06)[1])


def test_every_strategy_runs_on_a_batch_of_prompts(engine):
    """Each strategy on two prompts in one call (one batch on the core), the way the eval harness calls it."""
    options = {"best_of_n": {"n": 3}, "mbr": {"n": 3}, "arithmetic": {"n": 3}, "self_consistency": {"n": 3},
               "quality_rerank": {"n": 3}, "dola": {"dola_layers": [1]}, "entropy_switch": {"model": engine}}
    for name in sorted(SEARCHES):
        sampling = SamplingConfig(temperature=0.8, seed=1) if name in options and "n" in options[name] else \
            SamplingConfig()
        out = engine.generate(PROMPTS, 6, search=name, sampling=sampling, method="plain", stop=[], chat=False,
                              **options.get(name, {}))
        assert len(out) == 2 and all(r.token_ids and r.stats.score is not None for r in out), name
        alloc = engine.core.pool.allocator
        assert alloc.num_free == alloc.capacity, name  # every sequence's KV returned
        assert not engine.core.has_work(), name


def test_return_all(engine):
    found = engine.generate(PROMPTS[0], 6, search="beam", num_beams=3, return_all=True)
    assert isinstance(found, SearchResult)
    chosen, candidates = found
    assert chosen is candidates[0] and len(candidates) == 3
    assert [c.stats.score for c in candidates] == sorted((c.stats.score for c in candidates), reverse=True)
    many = engine.generate(PROMPTS, 6, search="beam", num_beams=2, return_all=True)
    assert [len(f.candidates) for f in many] == [2, 2]


def test_options_route_by_name(engine):
    a = engine.generate(PROMPTS[0], 6, search="beam", num_beams=3)
    b = engine.generate(PROMPTS[0], 6, search="beam", search_options={"num_beams": 3})
    assert a.token_ids == b.token_ids
    # n is the strategy's own; a strategy without one refuses it
    assert len(engine.generate(PROMPTS[0], 4, search="best_of_n", n=2, temperature=1.0, return_all=True)
               .candidates) == 2
    with pytest.raises(ValueError, match="returns one sequence per prompt; it takes no n"):
        engine.generate(PROMPTS[0], 4, search="beam", n=2)
    with pytest.raises(ValueError, match=r"unknown option 'num_beams' for search 'contrastive' \(its knobs: "
                                         r".*penalty_alpha.*\) or method 'plain'"):
        engine.generate(PROMPTS[0], 4, search="contrastive", num_beams=2)
    # a method knob is the method's; a name neither has is refused naming both
    drafted = engine.generate(PROMPTS[0], 4, search="best_of_n", n=2, temperature=1.0, method="pld", max_ngram=2)
    assert drafted.stats.method == "pld"
    with pytest.raises(ValueError, match="unknown option 'max_ngrams' for search 'best_of_n'.* or method 'pld'"):
        engine.generate(PROMPTS[0], 4, search="best_of_n", n=2, temperature=1.0, method="pld", max_ngrams=2)
    with pytest.raises(ValueError, match="unknown search 'beams'"):
        engine.generate(PROMPTS[0], 4, search="beams")
    with pytest.raises(ValueError, match="need search=NAME"):
        engine.generate(PROMPTS[0], 4, return_all=True)
    with pytest.raises(ValueError, match="run through generate"):
        engine.add_request(PROMPTS[0], 4, search="beam")


def test_a_method_knob_and_a_search_knob_of_one_name_are_refused(engine):
    with pytest.raises(ValueError, match="both a knob of search 'entropy_switch' and a knob of the method"):
        engine.generate(PROMPTS[0], 4, search="entropy_switch", method="draft", model=engine)


def test_the_cli_runs_a_search(capsys):
    code = main(["generate", "--model", "random:tiny-llama", "--device", "cpu", "--prompt", "hello", "--raw",
                 "--max-new-tokens", "5", "--json", "--all", "--search", "beam", "-S", "num_beams=3",
                 "-S", "length_penalty=0.5"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["candidates"]) == 3 and out["token_ids"] == out["candidates"][0]["token_ids"]
    engine = decodekit.load("random:tiny-llama", device="cpu")
    want = engine.generate("hello", 5, search="beam", num_beams=3, length_penalty=0.5)
    assert out["token_ids"] == want.token_ids and out["stats"]["score"] == pytest.approx(want.stats.score)
    assert main(["generate", "--model", "random:tiny-llama", "--prompt", "x", "--search", "beam",
                 "-S", "num_beams=0"]) == 1
    assert "num_beams must be an integer >= 1" in capsys.readouterr().err
    assert main(["searches"]) == 0
    assert "best_first_beam" in capsys.readouterr().out


@pytest.mark.parametrize("name,options", [("beam", {"num_beams": 3}), ("contrastive", {}), ("best_first_beam", {}),
                                          ("adadec", {"entropy_threshold": 0.0}), ("exact_extract", {}),
                                          ("entropy_switch", {"threshold": 5.0})])
def test_logprobs_of_the_chosen_tokens(engine, name, options):
    from search_helpers import next_logprobs

    if name == "entropy_switch":
        options = {**options, "model": engine}
    prompt = PROMPTS[1]
    r = engine.generate(prompt, 6, search=name, logprobs=2, **options)
    rows = next_logprobs(engine.model, [prompt + r.token_ids[:i] for i in range(len(r.token_ids))])
    assert len(r.logprobs) == len(r.token_ids)
    for row, tok, (lp, alts) in zip(rows, r.token_ids, r.logprobs):
        assert lp == pytest.approx(float(row[tok]), abs=1e-4)
        assert [a for a, _ in alts] == row.topk(2).indices.tolist()
