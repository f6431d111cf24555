"""Constraints in the engine: every method gives constrained plain decoding's output (greedy: token for token
against a masked-argmax reference loop; sampled: the masked target's distribution, by chi-square on a micro model),
jump-forward and pruning happen, AWRS, length and stop finishes, errors before decoding, mixed batches."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest
import torch

import decodekit
from decodekit.cli import main
from decodekit.constrain import Grammar, Matcher, constraint_spec
from decodekit.constrain.state import SequenceConstraint
from decodekit.engine import Engine
from decodekit.models.kv_cache import private_pool
from decodekit.sampling import SamplingConfig
from decodekit.speculative import DRAFTERS
from decodekit.speculative.base import Drafter, DraftTree

sys.path.insert(0, str(Path(__file__).parent.parent / "speculative"))  # the micro model's helpers
from micro import MICRO_PROMPT, VOCAB, chi_square_p, exact_pair_distribution, micro_engine, micro_model  # noqa: E402

from constrain_helpers import BACKENDS  # noqa: E402
from drafter_options import drafter_options  # noqa: E402

METHODS = sorted(DRAFTERS)
SCHEMA = {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "tag": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"}},
          "required": ["id", "tag", "ok"], "additionalProperties": False}
PROMPTS = [[5, 6, 7, 8, 9, 10] * 4, [3 + b for b in b'{"id": 12, "tag": "ab", "ok": true} {"id": ']]


def knobs(method: str, engine: Engine) -> dict:
    """Drafts that reach verification: the target drafting for itself, trained heads the shipped one or an untrained
    one where none ships (tiny models), and no budget cuts."""
    options = drafter_options(method, engine)
    return {"adaptive": False, **({"method_options": options} if options else {})}


@pytest.fixture(scope="module")
def tiny():
    return decodekit.load("random:tiny-llama", device="cpu", dtype="float32")


def reference_greedy(engine: Engine, grammar: Grammar, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Constrained greedy decoding by definition, one token a step: the argmax of the masked logits, until the
    grammar is done (or EOS, or the budget)."""
    model = engine.model
    _, kv = private_pool(model, len(prompt) + max_new_tokens + 8)
    m, out = grammar.matcher(), []
    with torch.no_grad():
        logits = model.forward_seq(kv, prompt, list(range(len(prompt))), logits="last")[-1].float()
        while len(out) < max_new_tokens:
            token = int(logits.masked_fill(~m.allowed(), float("-inf")).argmax())
            m.advance([token])
            out.append(token)
            if token in engine.eos_ids or m.done():
                break
            logits = model.forward_seq(kv, [token], [len(prompt) + len(out) - 1], logits="last")[-1].float()
    return out


# ---- greedy: identical to constrained plain decoding, for every method ------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_output_is_valid_and_the_same_for_every_method(tiny, backend):
    grammar = tiny.compile_constraint(constraint_spec(json_schema=SCHEMA), backend)
    for prompt in PROMPTS:
        want = reference_greedy(tiny, grammar, prompt, 60)
        for method in METHODS:
            r = tiny.generate(prompt, 60, method=method, json_schema=SCHEMA, constraint_backend=backend,
                              **knobs(method, tiny))
            assert r.token_ids == want, method
            assert r.finish_reason == "stop"
            jsonschema.validate(json.loads(r.text), SCHEMA)


def test_regex_and_grammar_outputs_match_for_every_method(tiny):
    lark = 'start: "(" item ("," item)* ")"\nitem: /[a-c]{1,3}/ | NUMBER\n%import common.NUMBER'
    for kw, check in [({"regex": r"[0-9]{2,4}-[a-z]{3}( [A-Z]+)?"}, r"[0-9]{2,4}-[a-z]{3}( [A-Z]+)?"),
                      ({"grammar": lark}, None)]:
        grammar = tiny.compile_constraint(constraint_spec(**kw))
        want = reference_greedy(tiny, grammar, PROMPTS[0], 24)
        for method in METHODS:
            r = tiny.generate(PROMPTS[0], 24, method=method, **kw, **knobs(method, tiny))
            assert r.token_ids == want, (method, kw)
        if check is not None and r.finish_reason == "stop":
            import re

            assert re.fullmatch(check, r.text)


def test_graph_runner_and_fused_chunks_never_skip_the_mask(tiny):
    """The static-buffer runner (what CUDA graphs replay) with fused greedy chunks on offer: a constrained
    sequence never takes them, also beside unconstrained sequences that could."""
    graphed = Engine(tiny.model, tiny.tokenizer, cuda_graphs=True)
    calls = []
    inner = graphed.core.runner.greedy_chunks
    graphed.core.runner.greedy_chunks = lambda *a, **kw: calls.append(a) or inner(*a, **kw)
    grammar = tiny.compile_constraint(constraint_spec(json_schema=SCHEMA))
    want = reference_greedy(tiny, grammar, PROMPTS[0], 60)
    assert graphed.generate(PROMPTS[0], 60, json_schema=SCHEMA).token_ids == want
    assert not calls
    free = graphed.generate(PROMPTS[1], 40, ignore_eos=True).token_ids  # alone, it takes fused chunks
    assert calls
    a = graphed.add_request(PROMPTS[0], 60, json_schema=SCHEMA)
    b = graphed.add_request(PROMPTS[1], 40, ignore_eos=True)
    while graphed.core.has_work():
        graphed.step()
    assert a.sequences[0].output == want and b.sequences[0].output == free


def test_a_batch_mixing_constrained_and_free_requests_gives_each_its_own_output(tiny):
    regex = r"[a-f]{3,8}"
    solo = [tiny.generate(PROMPTS[0], 30, json_schema=SCHEMA).token_ids,
            tiny.generate(PROMPTS[1], 30, ignore_eos=True).token_ids,
            tiny.generate(PROMPTS[1], 30, regex=regex, method="suffix").token_ids,
            tiny.generate(PROMPTS[0], 30, json_schema=SCHEMA, method="pld", temperature=1.0, seed=4).token_ids]
    reqs = [tiny.add_request(PROMPTS[0], 30, json_schema=SCHEMA),
            tiny.add_request(PROMPTS[1], 30, ignore_eos=True),
            tiny.add_request(PROMPTS[1], 30, regex=regex, method="suffix"),
            tiny.add_request(PROMPTS[0], 30, json_schema=SCHEMA, method="pld", temperature=1.0, seed=4)]
    while tiny.core.has_work():
        tiny.step()
    assert [r.sequences[0].output for r in reqs] == solo
    assert solo[1] != solo[0]
    for r in reqs:
        tiny.core.requests.pop(r.id)


# ---- jump-forward and pruning -----------------------------------------------------------------------------------
def test_jump_forward_takes_fewer_passes_than_tokens_on_fixed_keys(tiny):
    r = tiny.generate(PROMPTS[0], 60, json_schema=SCHEMA)
    assert r.finish_reason == "stop"
    assert r.stats.jump_forward_tokens >= len('"id": ') // 2  # the keys and punctuation came as free drafts
    assert r.stats.forward_passes < len(r.token_ids)
    assert r.stats.grammar_masks > 0 and r.stats.grammar_time_s > 0


class FixedDrafter(Drafter):
    """Proposes the same tree every step: two digits in a chain, a letter beside them, a digit below the letter."""

    name = "fixed"

    def propose(self, context):
        d1, d2, x = 3 + ord("1"), 3 + ord("2"), 3 + ord("x")
        return DraftTree([d1, d2, x, d1], [0, 1, 0, 3])

    def max_draft_tokens(self):
        return 4


def test_drafts_that_break_the_grammar_never_reach_the_pass(tiny):
    seen = []
    run = tiny.core.runner.run
    tiny.core.runner.run = lambda specs, *a, **k: seen.extend(s.tokens[1:] for s in specs if s.logits == "all") or \
        run(specs, *a, **k)
    try:
        grammar = tiny.compile_constraint(constraint_spec(regex="[0-9]{12}"))
        r = tiny.generate(PROMPTS[0], 12, regex="[0-9]{12}", method=FixedDrafter(), adaptive=False)
    finally:
        tiny.core.runner.run = run
    assert r.token_ids == reference_greedy(tiny, grammar, PROMPTS[0], 12)
    drafts = [t for row in seen for t in row]
    assert drafts and 3 + ord("x") not in drafts  # the letter and the digit under it were pruned
    assert all(row == [3 + ord("1"), 3 + ord("2")][:len(row)] for row in seen)  # shorter only near the end


# ---- finishes and errors ------------------------------------------------------------------------------------------
def test_a_grammar_the_budget_cannot_finish_ends_by_length_with_the_partial_text(tiny):
    for method in ["plain", "pld"]:
        r = tiny.generate(PROMPTS[0], 5, regex="[a-z]{30}", method=method)
        assert r.finish_reason == "length" and len(r.token_ids) == 5 and len(r.text) == 5 and r.text.isalpha()


def test_a_finished_grammar_stops_the_output_there(tiny):
    for kw in [{"choice": ["alpha", "beta", "gamma"]}, {"regex": "yes|no"}]:
        for method in ["plain", "pld"]:
            r = tiny.generate(PROMPTS[0], 40, method=method, **kw)
            assert r.finish_reason == "stop" and r.text in kw.get("choice", ["yes", "no"])


def test_ignore_eos_still_ends_where_the_grammar_does(tiny):
    r = tiny.generate(PROMPTS[0], 60, json_schema=SCHEMA, ignore_eos=True)
    assert r.finish_reason == "stop"
    jsonschema.validate(json.loads(r.text), SCHEMA)


@pytest.mark.parametrize("kw, message", [
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}},
     "invalid JSON schema"),
    ({"regex": "[0-9"}, "invalid regex"),
    ({"grammar": "start: (("}, "invalid grammar"),
    ({"choice": []}, "choice is an empty list"),
    ({"regex": "a", "choice": ["a"]}, "at most one constraint"),
    ({"response_format": {"type": "xml"}}, "unknown response_format type"),
    ({"regex": "a", "constraint_backend": "nope"}, "unknown grammar backend"),
    ({"regex": "a", "constraint_sampler": "nope"}, "unknown constraint_sampler"),
])
def test_bad_constraints_fail_in_one_line_before_any_decoding(tiny, kw, message):
    passes, before = [], set(tiny.core.requests)
    run = tiny.core.runner.run
    tiny.core.runner.run = lambda *a, **k: passes.append(1) or run(*a, **k)
    try:
        with pytest.raises(ValueError) as e:
            tiny.generate([PROMPTS[0], PROMPTS[1]], 8, **kw)
    finally:
        tiny.core.runner.run = run
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not passes and not tiny.core.has_work() and set(tiny.core.requests) == before


def test_response_format_json_object_and_json_schema(tiny):
    r = tiny.generate(PROMPTS[0], 80, response_format={"type": "json_object"})
    if r.finish_reason == "stop":
        assert isinstance(json.loads(r.text), dict)
    else:
        assert r.finish_reason == "length" and r.text.startswith("{")
    rf = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}
    assert tiny.generate(PROMPTS[0], 60, response_format=rf).token_ids == \
        tiny.generate(PROMPTS[0], 60, json_schema=SCHEMA).token_ids
    assert tiny.generate(PROMPTS[0], 20, response_format={"type": "text"}).token_ids == \
        tiny.generate(PROMPTS[0], 20).token_ids


def test_stream_and_samples_under_a_constraint(tiny):
    pieces = list(tiny.stream(PROMPTS[0], 60, json_schema=SCHEMA, method="pld"))
    assert "".join(pieces) == tiny.generate(PROMPTS[0], 60, json_schema=SCHEMA).text
    outs = tiny.generate(PROMPTS[1], 20, choice=["red", "green", "blue"], temperature=1.0, n=12, seed=0)
    assert all(o.text in ("red", "green", "blue") and o.finish_reason == "stop" for o in outs)


def test_awrs_is_used_only_where_it_equals_the_mask(tiny):
    def constraint(**kw):
        req = tiny.add_request(PROMPTS[0], 4, regex="[a-z]+", constraint_sampler="awrs", **kw)
        seq = req.sequences[0]
        tiny.core.abort(req)
        return seq.constraint

    assert constraint(temperature=1.0).awrs and constraint(temperature=0.7, repetition_penalty=1.3).awrs
    assert not constraint(temperature=1.0, top_p=0.9).awrs  # a warper must see the masked logits: the mask
    assert not constraint(temperature=0.0).awrs


def test_the_cli_takes_constraints_and_fails_in_one_line(tmp_path, capsys):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA))
    base = ["generate", "--model", "random:tiny-llama", "--device", "cpu", "--prompt", "hi", "--raw", "--json"]
    assert main(base + ["--json-schema", str(schema), "--max-new-tokens", "60"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["finish_reason"] == "stop"
    jsonschema.validate(json.loads(out["text"]), SCHEMA)
    assert main(base + ["--choice", "up", "--choice", "down", "--constraint-backend", "xgrammar"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] in ("up", "down")
    lark = tmp_path / "g.lark"
    lark.write_text('start: "a" "b"+')
    assert main(base + ["--grammar", str(lark), "--max-new-tokens", "6"]) == 0
    assert json.loads(capsys.readouterr().out)["text"].startswith("ab")
    for bad, message in [(["--regex", "[0-9"], "invalid regex"),
                         (["--json-schema", str(tmp_path / "missing.json")], "--json-schema: cannot read"),
                         (["--json-schema", "{oops"], "json_schema is not valid JSON"),
                         (["--regex", "a", "--choice", "a"], "at most one constraint")]:
        assert main(base + bad) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


# ---- sampled: the masked target's distribution (chi-square on the micro model) -----------------------------------
class NoRepeatMatcher(Matcher):
    """A grammar over the micro model's 6 tokens: never the same token twice in a row, never 0 first, and 0 always
    after 5 (forced: jump-forward). It never ends (the micro model has no EOS)."""

    vocab_size, eos_ids = VOCAB, ()

    def __init__(self, history=()) -> None:
        self.history = list(history)

    def allowed_set(self) -> set[int]:
        last = self.history[-1] if self.history else None
        return {0} if last == 5 else {t for t in range(VOCAB) if t != last and (last is not None or t != 0)}

    def fill_bitmask(self, out):
        out.zero_()
        out[0] = sum(1 << t for t in self.allowed_set())

    def allows(self, token):
        return token in self.allowed_set()

    def advance(self, tokens):
        before = len(self.history)
        for t in tokens:
            if not self.allows(t):
                del self.history[before:]
                raise ValueError(f"token {t} is not allowed")
            self.history.append(t)

    def rollback(self, n):
        del self.history[len(self.history) - n:]

    def forced(self):
        return [0] if self.history and self.history[-1] == 5 else []

    def accepting(self):
        return False

    def done(self):
        return False

    def fork(self):
        return NoRepeatMatcher(self.history)


class NoRepeat(Grammar):
    spec = None

    def matcher(self):
        return NoRepeatMatcher()


def allowed_after(output: list[int]) -> torch.Tensor:
    mask = torch.zeros(VOCAB, dtype=torch.bool)
    mask[list(NoRepeatMatcher(output).allowed_set())] = True
    return mask


@pytest.fixture(scope="module")
def micro():
    return micro_engine()


def masked_pairs(engine: Engine, method: str, sampling: SamplingConfig, n: int, **options) -> torch.Tensor:
    counts = torch.zeros(VOCAB * VOCAB)
    s = SamplingConfig(**{**sampling.__dict__, "seed": 1000})
    for r in engine.generate(MICRO_PROMPT, 3, method=method, sampling=s, n=n, constraint=NoRepeat(), **options):
        counts[r.token_ids[1] * VOCAB + r.token_ids[2]] += 1
    return counts


SAMPLED = [("plain", SamplingConfig(temperature=1.0), {}),
           ("plain", SamplingConfig(temperature=0.8, top_k=4), {}),
           ("pld", SamplingConfig(temperature=1.0), {"num_draft": 3}),
           ("recycling", SamplingConfig(temperature=0.7, top_p=0.9), {}),
           ("draft", SamplingConfig(temperature=1.0), {"tree_width": 3, "max_nodes": 6, "num_draft": 3})]


@pytest.mark.parametrize("method, sampling, options", SAMPLED, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(SAMPLED)])
def test_sampled_constrained_output_follows_the_masked_target(micro, method, sampling, options):
    if method == "draft":  # a stochastic tree from another model: pruning must renormalize its draft rows
        options = {**options, "model": micro_model(5, 4.0)}
    probs = exact_pair_distribution(micro, sampling, allowed_after)
    counts = masked_pairs(micro, method, sampling, 1500, method_options=options, adaptive=False)
    assert chi_square_p(counts, probs) > 1e-3


def test_awrs_follows_the_masked_target_and_checks_instead_of_masking(micro):
    sampling = SamplingConfig(temperature=1.0, repetition_penalty=1.2)
    probs = exact_pair_distribution(micro, sampling, allowed_after)
    counts = torch.zeros(VOCAB * VOCAB)
    s = SamplingConfig(**{**sampling.__dict__, "seed": 7})
    results = micro.generate(MICRO_PROMPT, 3, sampling=s, n=1500, constraint=NoRepeat(), constraint_sampler="awrs")
    for r in results:
        counts[r.token_ids[1] * VOCAB + r.token_ids[2]] += 1
    assert chi_square_p(counts, probs) > 1e-3
    # Masks only where the grammar forced a token (a draft step) or AWRS gave up: far fewer than tokens.
    assert sum(r.stats.grammar_masks for r in results) < 0.5 * sum(len(r.token_ids) for r in results)


class RepeatDrafter(Drafter):
    """A stochastic drafter the grammar mostly refuses: one token, the last one again (never allowed) with
    probability 0.7, else from a fixed skewed distribution. Its draft rows must be conditioned on the grammar."""

    name = "repeat"

    def __init__(self) -> None:
        self.generator = torch.Generator().manual_seed(5)
        self.skew = torch.tensor([0.05, 0.4, 0.05, 0.3, 0.1, 0.1])

    def propose(self, context):
        q = 0.3 * self.skew
        q[context[-1]] += 0.7
        token = int(torch.multinomial(q, 1, generator=self.generator))
        return DraftTree.chain([token], q[None].clone())

    def max_draft_tokens(self):
        return 1


@pytest.mark.parametrize("renormalize", [True, False])
def test_pruning_a_stochastic_draft_keeps_the_distribution_only_with_its_rows_conditioned(micro, monkeypatch,
                                                                                        renormalize):
    """With the rows conditioned (prune_tree) the masked target's distribution; without (negative control: the
    breaking nodes dropped, the rows left as drafted), a different one, and the test sees it."""
    from decodekit.constrain import state, tree

    if not renormalize:
        monkeypatch.setattr(state, "prune_tree", lambda t, allowed, valid: tree.prune_tree(
            t, torch.ones_like(allowed), valid))
    sampling = SamplingConfig(temperature=1.0)
    probs = exact_pair_distribution(micro, sampling, allowed_after)
    p = chi_square_p(masked_pairs(micro, RepeatDrafter(), sampling, 1500, adaptive=False), probs)
    assert p > 1e-3 if renormalize else p < 1e-3


def test_sequence_constraint_prunes_and_jumps(micro):
    c = SequenceConstraint(NoRepeatMatcher([1]), torch.device("cpu"))
    tree, jumped = c.shape(DraftTree([2, 2, 1, 1], [0, 1, 0, 3]), room=10)  # 2 2: a repeat; 1 after 1: too
    assert tree.tokens == [2] and tree.parents == [0] and not jumped
    c = SequenceConstraint(NoRepeatMatcher([5]), torch.device("cpu"))
    assert c.shape(DraftTree([3], [0]), room=10) == (DraftTree.chain([0]), True)  # forced 0 replaces the draft
    assert c.shape(DraftTree([0, 3], [0, 1]), room=10)[1] is False  # the draft already starts with it
    assert c.shape(DraftTree(), room=1) == (DraftTree(), False)  # no room for a draft


# ---- the real model --------------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_real_model_greedy_constrained_is_identical_across_methods():
    """SmolLM2-135M-Instruct in float32: schema-valid JSON, the same tokens from every method and both backends
    as the masked-argmax reference, and jump-forward saving passes."""
    engine = decodekit.load("smollm2", device="cpu", dtype="float32", progress=False)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                               "city": {"type": "string", "maxLength": 20}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    prompt = engine.encode("Ann is 31 and lives in Oslo. Describe her as a JSON object with name, age and city.",
                           chat=True)
    for backend in BACKENDS:  # each backend against its own reference: they may allow different tokenizations
        want = reference_greedy(engine, engine.compile_constraint(constraint_spec(json_schema=schema), backend),
                                prompt, 48)
        for method in ["plain", "pld", "suffix", "recycling", "draft"]:
            r = engine.generate(prompt, 48, method=method, json_schema=schema, constraint_backend=backend,
                                **knobs(method, engine))
            assert r.token_ids == want, (backend, method)
            assert r.finish_reason == "stop"
            jsonschema.validate(json.loads(r.text), schema)
            if method == "plain":
                assert r.stats.forward_passes < len(r.token_ids) and r.stats.jump_forward_tokens >= 5
