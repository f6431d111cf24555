"""Trained heads on the graph runner: the captured target passes return the hidden states the eager runner returns
(same rows, same bookkeeping, eager rows of the step placed right), and a head's draft pass replayed over padded
static buffers drafts what the tight eager pass drafts. On the CPU the graph runner's "replay" calls the captured
function (`graphs._Eager`), so the static-buffer paths run here; on a GPU they are CUDA graphs (the same tests)."""
from __future__ import annotations

import pytest
import torch

import decodekit
from decodekit.engine import Engine
from decodekit.engine.core import EngineCore, Request
from head_helpers import HEADS, saved_head

SHORT, LONG = [9, 4, 4, 11, 2, 8, 5, 6, 1, 9, 12, 3], [5, 6, 7, 8, 9, 10] * 5  # first draft: padded / tight


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # cuda: real captures (blocks not compiled)


@pytest.fixture(scope="module", params=DEVICES)
def engines(request):
    eager = decodekit.load("random:tiny-llama", device=request.param, dtype="float32", cuda_graphs=False)
    return Engine(eager.model, eager.tokenizer, cuda_graphs=True), eager


@pytest.fixture(scope="module")
def heads(engines, tmp_path_factory):
    config = engines[1].model.config
    return {arch: saved_head(arch, config, tmp_path_factory.mktemp(arch)) for arch in HEADS}


def record(engine, monkeypatch) -> list:
    """Per pass of `engine`'s runner: the layers asked for and, per row, its tokens, logits and features (read as
    the core reads them: `first_logit`, `_hidden_rows`)."""
    runner, calls = engine.core.runner, []
    run = runner.run

    def recorded(specs, hidden_layers=()):
        out = run(specs, hidden_layers)
        logits, hidden = out if hidden_layers else (out, None)
        rows = []
        for s in specs:
            n = len(s.tokens) if s.logits == "all" else int(s.logits == "last")
            feats = None if hidden is None else EngineCore._hidden_rows(hidden, hidden_layers, s, s.first_logit, n)
            rows.append((list(s.tokens), logits[s.first_logit:s.first_logit + n], feats))
        calls.append((hidden_layers, rows))
        return out

    monkeypatch.setattr(runner, "run", recorded)
    return calls


def prototype(engine, arch: str, **options):
    """The engine's bound drafter for `arch` with these options (the key `EngineCore._prototype` files it under)."""
    return engine.core.drafters[EngineCore.method_key(Request([], 1, method=arch, method_options=options))]


def assert_same_passes(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (layers_a, rows_a), (layers_b, rows_b) in zip(got, want):
        assert layers_a == layers_b and len(rows_a) == len(rows_b)
        for (tokens_a, logits_a, feats_a), (tokens_b, logits_b, feats_b) in zip(rows_a, rows_b):
            assert tokens_a == tokens_b  # the same root and draft: the heads drafted the same trees
            torch.testing.assert_close(logits_a, logits_b, rtol=1e-5, atol=1e-5)
            assert (feats_a is None) == (feats_b is None)
            if feats_a is not None:
                torch.testing.assert_close(feats_a, feats_b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", HEADS)
def test_graph_passes_and_drafts_equal_the_eager_ones(arch, engines, heads, monkeypatch):
    graphed, eager = engines
    options = dict(path=heads[arch], depth=3, branch=3, max_nodes=8)
    got, want = record(graphed, monkeypatch), record(eager, monkeypatch)
    a = graphed.generate([SHORT, LONG], 24, method=arch, adaptive=False, ignore_eos=True, **options)
    b = eager.generate([SHORT, LONG], 24, method=arch, adaptive=False, ignore_eos=True, **options)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.stats.decode_steps for r in a] == [r.stats.decode_steps for r in b]
    assert_same_passes(got, want)
    proto = prototype(graphed, arch, **options)
    assert any(key[4] == proto.feature_layers for key in graphed.core.runner.passes)  # verify passes with features
    assert sum(len(lane.passes) for lane in proto.idle_lanes) >= 2  # the draft passes ran captured


@pytest.mark.parametrize("arch", HEADS)
def test_greedy_through_the_graph_path_equals_plain_and_reuses_captures(arch, engines, heads):
    graphed, eager = engines
    plain = [r.token_ids for r in eager.generate([SHORT, LONG, SHORT[::-1]], 40, ignore_eos=True)]
    kw = dict(method=arch, path=heads[arch], adaptive=False, ignore_eos=True)
    assert [r.token_ids for r in graphed.generate([SHORT, LONG, SHORT[::-1]], 40, **kw)] == plain
    proto = prototype(graphed, arch, path=heads[arch])
    lanes = {id(lane) for lane in proto.idle_lanes}
    assert len(lanes) == 3  # three sequences at once drafted on three lanes, each given back at its end

    def captured():
        return {id(p) for lane in proto.idle_lanes for p in lane.passes.values()}

    assert graphed.generate(SHORT, 40, **kw).token_ids == plain[0]
    before = captured()
    assert graphed.generate(SHORT, 40, **kw).token_ids == plain[0]
    # the same sequence again took a lane back and replayed what it captured: nothing new
    assert {id(lane) for lane in proto.idle_lanes} == lanes and captured() == before


def test_mixed_batch_of_a_head_plain_and_pld_through_the_graph_path(engines, heads, monkeypatch):
    """An eagle row (features asked for), a plain row and a pld row share each pass; each decodes as alone."""
    graphed, eager = engines
    prompts = [SHORT, LONG, [3, 4, 5, 6] * 4]
    methods = [dict(method="eagle", path=heads["eagle"], adaptive=False), dict(), dict(method="pld")]
    calls = record(graphed, monkeypatch)
    reqs = [graphed.add_request(p, 30, ignore_eos=True, **m) for p, m in zip(prompts, methods)]
    while graphed.core.has_work():
        graphed.step()
    for req, p, m in zip(reqs, prompts, methods):
        assert req.sequences[0].output == eager.generate(p, 30, ignore_eos=True, **m).token_ids
    mixed = [rows for layers, rows in calls if layers and len(rows) == 3 and len(rows[1][0]) == 1]
    assert mixed  # decode passes holding all three rows, with features
    assert all(rows[0][2] is not None and rows[1][2] is None and rows[2][2] is None for rows in mixed)
    assert any(len(rows[0][0]) > 1 for rows in mixed)  # the eagle row brought a draft tree
    assert any(key[4] and key[0] >= 3 for key in graphed.core.runner.passes)  # replayed as one captured pass


@pytest.mark.real_model
def test_shipped_eagle_head_on_smollm2_drafts_the_same_through_the_graph_path():
    """SmolLM2 in float32 with its shipped EAGLE head: the static-buffer path (padded captured passes) commits what
    plain greedy does and drafts as the eager path does (the same acceptance at every depth)."""
    from decodekit.bench.datasets import SAMPLE, load_prompts

    eager = decodekit.load("smollm2", device="cpu", dtype="float32", progress=False)
    graphed = Engine(eager.model, eager.tokenizer, name="smollm2", cuda_graphs=True)
    for p in load_prompts(str(SAMPLE), 1)[:2]:
        plain = eager.generate(p.prompt, 32, chat=True)
        a = graphed.generate(p.prompt, 32, chat=True, method="eagle", adaptive=False)
        b = eager.generate(p.prompt, 32, chat=True, method="eagle", adaptive=False)
        assert a.token_ids == b.token_ids == plain.token_ids, p.category
        assert a.stats.decode_steps == b.stats.decode_steps < plain.stats.decode_steps
        assert a.stats.accepted_by_position == b.stats.accepted_by_position
