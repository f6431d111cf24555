"""`generate(..., trace=True)`: every decode step's shape, as the verifier saw it, and the drafters' own passes."""
from dataclasses import dataclass

import pytest

import decodekit
from decodekit.speculative.base import DraftTree, Drafter
from decodekit.engine.sequence import Sequence
from engine_helpers import fused_engine

REPETITIVE = "abcabcabcabcabcabc abcabc abcabc"


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("random:tiny-llama", device="cpu", dtype="float32")


@pytest.fixture
def seen(monkeypatch):
    """(tree parents, accepted nodes) of every call of the verifier, through `Sequence.verify`."""
    calls = []
    inner = Sequence.verify

    def verify(self, logits, best):
        accepted, token = inner(self, logits, best)
        calls.append((list(self.tree.parents), self.tree.is_chain(), len(accepted)))
        return accepted, token

    monkeypatch.setattr(Sequence, "verify", verify)
    return calls


def verified_tokens(trace):
    return sum(s["accepted"] + 1 for s in trace["steps"] if "fused" not in s)


@pytest.mark.parametrize("method,options", [
    ("plain", {}), ("pld", {}), ("layerskip", {}), ("lookahead", {}), ("eagle", {"init": "random"}),
    ("medusa", {"init": "random"}), ("draft", {"model": "random:tiny-llama@1"}),
])
@pytest.mark.parametrize("adaptive", [None, False])
def test_accepted_counts_sum_to_the_tokens_generated(engine, method, options, adaptive):
    r = engine.generate(REPETITIVE, 30, method=method, method_options=options, ignore_eos=True, trace=True,
                        adaptive=adaptive)
    t = r.stats.trace
    assert r.stats.generated_tokens == 30
    assert t["prompt_tokens"] == len(r.prompt_ids) and t["method"] == r.stats.method
    # The first token comes from the prefill; every verified step commits its accepted nodes and the next token.
    assert 1 + verified_tokens(t) == 30
    assert 1 + sum(s["committed"] for s in t["steps"]) == 30
    assert len(t["steps"]) == r.stats.decode_steps  # the CPU runner has no fused chunks: one step a pass


def test_widths_are_those_the_verifier_saw(engine, seen):
    r = engine.generate(REPETITIVE, 40, method="pld", num_draft=5, adaptive=False, ignore_eos=True, trace=True)
    steps = r.stats.trace["steps"]
    assert [(s["verify_width"], s["accepted"]) for s in steps] == [(len(p) + 1, a) for p, _, a in seen]
    assert all(s["tree"] is False for s in steps)  # pld drafts chains
    assert max(s["verify_width"] for s in steps) > 1 and all(s["verify_width"] <= 6 for s in steps)
    assert all(s["draft_passes"] == [] for s in steps)  # prompt lookup runs no forward pass


@dataclass
class Repeat(Drafter):
    """Drafts `k` copies of the root: a known draft length at every step."""

    name = "repeat"
    k: int = 4

    def propose(self, context):
        return DraftTree.chain([context[-1]] * self.k)

    def max_draft_tokens(self):
        return self.k


def test_a_known_draft_length(engine, seen):
    new, k = 25, 4
    r = engine.generate([7, 7, 7, 7, 7, 7], new, method=Repeat(k), adaptive=False, ignore_eos=True, trace=True)
    steps = r.stats.trace["steps"]
    done = 1  # the prefill's token
    for s in steps:  # every step drafts k, cut to the room left (the step adds accepted + 1 tokens)
        assert s["verify_width"] == 1 + min(k, new - done - 1)
        done += s["accepted"] + 1
    assert done == new and [s["accepted"] for s in steps] == [a for _, _, a in seen]


def test_a_tree_is_recorded_with_its_parents(engine, seen):
    r = engine.generate(REPETITIVE, 12, method="eagle", init="random", adaptive=False, ignore_eos=True, trace=True)
    steps = r.stats.trace["steps"]
    assert [s["tree"] for s in steps] == [False if chain else parents for parents, chain, _ in seen]
    trees = [s for s in steps if s["tree"]]
    assert trees and all(s["verify_width"] == len(s["tree"]) + 1 for s in trees)
    # EAGLE's passes: one decoder layer of the head each; the first reads a row per prompt token (the feature of
    # token t with the embedding of token t + 1: the first output token's too), then the LM head on the last.
    first = steps[0]["draft_passes"]
    assert first[0] == {"model": "head", "width": len(r.prompt_ids), "kv": 0, "layers": 1, "logits": 1}
    assert all(d["model"] == "head" and d["layers"] == 1 for s in steps for d in s["draft_passes"])


def test_draft_model_passes(engine):
    num_draft = 3
    r = engine.generate(REPETITIVE, 20, method="draft", model="random:tiny-llama@1", num_draft=num_draft,
                        adaptive=False, ignore_eos=True, trace=True)
    steps = r.stats.trace["steps"]
    passes = steps[0]["draft_passes"]
    # First: the draft model prefills the whole context (the prompt and the root, the first output token), then
    # one pass per further draft token.
    assert passes[0]["model"] == "draft_model" and passes[0]["width"] == len(r.prompt_ids) + 1
    assert passes[0]["kv"] == 0
    for s in steps:
        drafted = s["verify_width"] - 1
        if drafted == num_draft:  # a full chain: the sync pass, then num_draft - 1 passes of one token
            assert len(s["draft_passes"]) == num_draft
            assert [d["width"] for d in s["draft_passes"][1:]] == [1] * (num_draft - 1)
        assert all(d["model"] == "draft_model" and d["layers"] == d["of"] == 2 for d in s["draft_passes"])


def test_layerskip_passes_run_fewer_layers():
    four = decodekit.load("random:tiny-gemma3", device="cpu", dtype="float32")  # 4 layers: one skippable of 2
    r = four.generate(REPETITIVE, 16, method="layerskip", skip_ratio=0.3, adapt=False, adaptive=False,
                      ignore_eos=True, trace=True)
    passes = [d for s in r.stats.trace["steps"] for d in s["draft_passes"]]
    assert passes and all(d["model"] == "target" and (d["layers"], d["of"]) == (3, 4) for d in passes)
    # The draft writes past the target's entries of the committed text: it reads them all.
    committed = 0
    for s in r.stats.trace["steps"]:
        if s["draft_passes"]:  # its first pass feeds the root: after the prompt and the tokens committed so far
            assert s["draft_passes"][0]["kv"] == len(r.prompt_ids) + committed
        committed += s["committed"]


def test_fused_chunks_are_recorded(engine):
    fused = fused_engine(engine)
    r = fused.generate(REPETITIVE, 16 * 2 + 4 + 3, ignore_eos=True, trace=True)
    steps = r.stats.trace["steps"]
    chunks = [s["fused"] for s in steps if "fused" in s]
    calls = fused.core.runner.chunk_calls
    assert chunks == [{"steps": st, "chunks": ch} for ch, st in calls]
    assert 1 + sum(s["committed"] for s in steps) == r.stats.generated_tokens
    assert sum(s["committed"] if "fused" in s else 1 for s in steps) == r.stats.decode_steps


def test_trace_off_and_refused_with_a_policy(engine):
    assert engine.generate(REPETITIVE, 4, method="pld").stats.trace is None
    with pytest.raises(ValueError, match="trace"):
        engine.generate(REPETITIVE, 4, search="beam", trace=True)
