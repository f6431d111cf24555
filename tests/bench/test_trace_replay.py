"""Trace files (record, write, read) and the trace replay on the CPU (tiny shapes)."""
import importlib.util
import json
from pathlib import Path

import pytest

import decodekit
from decodekit.bench.datasets import BenchPrompt
from decodekit.bench.replay import Replayer, committed, path_nodes, replay_traces
from decodekit.bench.trace import read_traces, record, write_traces
from decodekit.engine import Engine

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [BenchPrompt("a", "rep", "abcabcabcabcabcabc abcabc abcabc"), BenchPrompt("b", "other", "the cat sat on")]
METHODS = ["pld", "layerskip", "eagle:init=random", "draft:model=random:tiny-llama@1"]


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("random:tiny-llama", device="cpu", dtype="float32", prefix_caching=False)


@pytest.fixture(scope="module")
def lines(engine):
    return record(engine, "random:tiny-llama", METHODS, PROMPTS, 24)


def test_a_trace_file_round_trips(lines, tmp_path):
    assert [(ln["method"], ln["prompt_id"]) for ln in lines] == [(m, p.id) for m in METHODS for p in PROMPTS]
    assert all(1 + committed(ln["trace"]) == ln["generated"] for ln in lines)
    path = tmp_path / "t.jsonl"
    write_traces(path, lines)
    assert read_traces(path) == lines
    (tmp_path / "bad.jsonl").write_text('{"method": "pld"}\n')
    with pytest.raises(ValueError, match="not a trace line"):
        read_traces(tmp_path / "bad.jsonl")
    (tmp_path / "junk.jsonl").write_text("nope\n")
    with pytest.raises(ValueError, match="not JSON"):
        read_traces(tmp_path / "junk.jsonl")


def test_path_nodes():
    assert path_nodes(False, 3) == [0, 1, 2, 3]
    assert path_nodes([0, 0, 2, 3], 3) == [0, 2, 3, 4]  # the first node of depth 3, with its ancestors
    assert path_nodes([0, 0, 2], 0) == [0]
    with pytest.raises(ValueError):
        path_nodes([0, 0], 2)


def test_the_replay_runs_the_recorded_passes(engine, lines, monkeypatch):
    """Every verify pass has the recorded width, tree and starting KV length (the cache grows by accepted + 1)."""
    replayer = Replayer(engine, decodekit.load("random:tiny-llama@2", device="cpu", dtype="float32"))
    runner = engine.core.runner
    passes, inner = [], runner.run
    monkeypatch.setattr(runner, "run", lambda specs, *a: passes.append(
        (len(specs[0].tokens), specs[0].kv.length, specs[0].tree is not None)) or inner(specs, *a))
    trace = next(ln for ln in lines if ln["method"] == "eagle:init=random")["trace"]
    replayer.time(trace, repeats=1)
    want, length = [], trace["prompt_tokens"]
    for s in trace["steps"]:
        want.append((s["verify_width"], length, bool(s["tree"])))
        length += s["accepted"] + 1
    assert passes == want * 2  # the warm-up, then one timed replay
    replayer.release()


@pytest.mark.parametrize("graphs", [False, True])
def test_replay_on_the_cpu_reports_a_plain_baseline(engine, lines, graphs):
    target = Engine(engine.model, engine.tokenizer, cuda_graphs=True) if graphs else engine  # graphs: CPU "replays"
    draft = decodekit.load("random:tiny-llama@2", device="cpu", dtype="float32")
    seen = []  # the figures so far after every trace (a replay cut short keeps them)
    methods = replay_traces(Replayer(target, draft), lines, repeats=1, on_trace=lambda m: seen.append(
        sum(x["traces"] for x in m.values())))
    assert seen == list(range(1, len(lines) + 1))
    assert list(methods) == METHODS
    for name, m in methods.items():
        traces = [ln for ln in lines if ln["method"] == name]
        assert m["traces"] == len(traces) and m["tokens"] == sum(ln["generated"] - 1 for ln in traces)
        assert m["seconds"] > 0 and m["plain_s"] > 0 and m["plain_single_s"] > 0
        assert m["speedup"] == pytest.approx(m["plain_s"] / m["seconds"])
    # tau: the tokens a decode step commits, as the engine counts it (`stats.tau`)
    ln = lines[0]
    steps = sum(s["committed"] if "fused" in s else 1 for s in ln["trace"]["steps"])
    assert methods[ln["method"]]["tau"] == pytest.approx(
        sum(x["generated"] - 1 for x in lines if x["method"] == ln["method"]) /
        sum(len(x["trace"]["steps"]) for x in lines if x["method"] == ln["method"]))
    assert steps == len(ln["trace"]["steps"])


def test_fused_steps_and_fused_draft_passes_replay(engine):
    """Recorded where the runner fuses greedy chunks (a GPU; here the CPU's eager reference of them): plain steps
    and a compressed-cache drafter's chain are fused chunks, replayed as such."""
    fused = Engine(engine.model, engine.tokenizer)
    fused.core.runner.fused_sizes = (16, 4)
    prompt = [BenchPrompt("c", "long", "abcabcabcabc abc abc the cat sat on the mat " * 3)]
    lines = record(fused, "random:tiny-llama", ["plain", "magicdec"], prompt, 40)
    steps = [s for ln in lines for s in ln["trace"]["steps"]]
    assert any("fused" in s for s in steps)
    assert any(d.get("steps") for s in steps for d in s["draft_passes"])
    graphed = Engine(engine.model, engine.tokenizer, cuda_graphs=True)
    calls, inner = [], graphed.core.runner.greedy_chunks
    graphed.core.runner.greedy_chunks = lambda kvs, r, p, st, ch, **kw: calls.append((st, ch)) or \
        inner(kvs, r, p, st, ch, **kw)
    methods = replay_traces(Replayer(graphed), lines, repeats=1)
    assert methods["plain"]["tokens"] == 39 and methods["magicdec"]["seconds"] > 0
    recorded = [(s["fused"]["steps"], s["fused"]["chunks"]) for s in lines[0]["trace"]["steps"] if "fused" in s]
    calls.clear()
    Replayer(graphed).time(lines[0]["trace"], repeats=1)
    assert calls == recorded * 2  # the warm-up, then one timed replay


def test_head_passes_run_on_the_head_engine_with_one_host_read_a_step(engine, lines, monkeypatch):
    """With a head engine (the replay shape cut to one layer), every recorded head pass goes through its runner with
    the recorded width, reading its own cache at the recorded length; only a step's last head pass reaches the host."""
    head = decodekit.load("random:tiny-llama:layers=1", device="cpu", dtype="float32", prefix_caching=False)
    assert head.model.config.num_layers == 1
    passes, reads, inner = [], [], head.core.runner.run

    class Out:  # the runner's logits, counting the host reads
        def __init__(self, t):
            self.t, self.shape = t, t.shape

        def argmax(self, dim):
            reads.append(1)
            return self.t.argmax(dim)

    monkeypatch.setattr(head.core.runner, "run", lambda specs, *a: passes.append(
        (len(specs[0].tokens), specs[0].kv.length)) or Out(inner(specs, *a)))
    trace = next(ln for ln in lines if ln["method"] == "eagle:init=random")["trace"]
    Replayer(engine, head=head).time(trace, repeats=1)
    want = [(d["width"], d["kv"]) for s in trace["steps"] for d in s["draft_passes"] if d["model"] == "head"]
    assert want and passes == want * 2  # the warm-up, then one timed replay
    steps_with_reads = sum(1 for s in trace["steps"] if s["draft_passes"] and s["draft_passes"][-1].get("logits") != 0)
    assert len(reads) == 2 * steps_with_reads


def test_a_draft_model_trace_needs_a_draft_model(engine, lines):
    line = next(ln for ln in lines if ln["method"].startswith("draft"))
    with pytest.raises(ValueError, match="--draft-model"):
        Replayer(engine).time(line["trace"], repeats=1)


def test_record_and_replay_scripts(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text("\n".join(json.dumps({"id": p.id, "category": p.category, "prompt": p.prompt})
                              for p in PROMPTS) + "\n")
    out, report = tmp_path / "t.jsonl", tmp_path / "r.json"
    load = lambda name: importlib.util.module_from_spec(  # noqa: E731
        importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py"))
    rec = load("trace_record")
    rec.__spec__.loader.exec_module(rec)
    rec.main(["--model", "random:tiny-llama", "--device", "cpu", "--methods", "pld;medusa:init=random",
              "--dataset", str(data), "--max-new-tokens", "12", "--out", str(out)])
    assert len(read_traces(out)) == 4
    rep = load("trace_replay")
    rep.__spec__.loader.exec_module(rep)
    result = rep.main(["--trace", str(out), "--model", "random:tiny-llama", "--device", "cpu", "--repeats", "1",
                       "--json", str(report)])
    table = capsys.readouterr().out
    assert "TRACE REPLAY" in table and "pld" in table and "medusa:init=random" in table
    saved = json.loads(report.read_text())
    assert saved["meta"]["label"] == "trace replay" and saved["meta"]["draft_model"] is None
    assert saved["meta"]["head_model"] == "random:tiny-llama:layers=1"  # medusa's passes: a one-layer shape
    assert set(saved["methods"]) == {"pld", "medusa:init=random"} == set(result["methods"])
    with pytest.raises(SystemExit, match="no trace"):
        rep.main(["--trace", str(out), "--model", "random:tiny-llama", "--device", "cpu", "--methods", "eagle"])


@pytest.mark.real_model
def test_a_real_model_trace_replays():
    """SmolLM2 with its shipped EAGLE head: trees are drafted and accepted, counts add up, and the trace replays."""
    real = decodekit.load("smollm2", device="cpu", dtype="float32", progress=False, prefix_caching=False)
    prompt = [BenchPrompt("r", "extraction", "List the first five prime numbers, then list them again.")]
    lines = record(real, "smollm2", ["eagle", "pld"], prompt, 32)
    for ln in lines:
        assert 1 + committed(ln["trace"]) == ln["generated"]
    steps = lines[0]["trace"]["steps"]
    assert any(s["tree"] and s["accepted"] > 0 for s in steps)
    assert all(d["model"] == "head" for s in steps for d in s["draft_passes"])
    tiny = decodekit.load("random:tiny-llama", device="cpu", dtype="float32")
    methods = replay_traces(Replayer(tiny), lines, repeats=1)
    assert methods["eagle"]["tau"] > 1.0 and methods["eagle"]["seconds"] > 0
