"""Long-context evals: samples say what they should (length, needle depth, answers in the prompt), scoring follows
its definition, and the pipeline runs end to end on a tiny model (a pipeline test: a random model finds nothing).
One real-model check: Gemma 3 270M finds a needle in 1.5k tokens, uncompressed and with 2-bit KIVI."""
import json
import random
import subprocess
import sys

import pytest

import decodekit
from decodekit.eval.long_context import (RULER, Haystack, PressConfig, Sample, make_sample, make_samples, parse_tasks,
                                         report, run, score, summary, vocabulary)

TEXT = " ".join(f"Sentence number {i} talks about apples and rivers and quiet mornings." for i in range(400))


@pytest.fixture(scope="module")
def engine():
    return decodekit.load("random:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def haystack(engine):
    return Haystack.load(engine.tokenizer, text=TEXT)


def count(engine, text):
    return len(engine.tokenizer.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("task", ["niah", "niah_multikey", "niah_multivalue", "vt", "cwe", "fidelity"])
def test_samples_have_the_length_and_answers_asked(task, engine, haystack):
    words = vocabulary(haystack) + [f"word{i}" for i in range(300)]
    s = make_sample(task, haystack, engine.tokenizer, 1500, 0.5, random.Random(0), words)
    n = count(engine, s.prompt)
    assert 0.8 * 1500 <= n <= 1.05 * 1500, n
    for a in s.answers:
        assert a in s.prompt
    if task == "niah_multikey":
        assert s.prompt.count("One of the special magic numbers for") == 4
    if task == "vt":
        assert len(s.answers) == 5 and f"VAR {s.answers[1]} = VAR {s.answers[0]}." in s.prompt
    if task == "cwe":
        listed = [line.split(". ", 1)[1] for line in s.prompt.splitlines() if line[:1].isdigit()]
        counts = {w: listed.count(w) for w in set(listed)}
        assert min(counts[w] for w in s.answers) > max(c for w, c in counts.items() if w not in s.answers)


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_needle_sits_at_its_depth(depth, engine, haystack):
    s = make_sample("niah", haystack, engine.tokenizer, 1200, depth, random.Random(1), vocabulary(haystack))
    body = s.prompt.split("\n", 1)[1].rsplit("\nWhat is", 1)[0]
    needle = f"One of the special magic numbers for {s.meta['key']} is: {s.answers[0]}."
    where = body.index(needle) / (len(body) - len(needle))  # the share of the haystack before it
    assert abs(where - depth) < 0.05


def test_score_is_the_share_of_answers_found():
    s = Sample("niah_multivalue", 10, 0.5, "", ["12345", "67890", "11111", "22222"])
    assert score(s, "12345 and 67890, also 1111") == 0.5
    words = Sample("cwe", 10, None, "", ["apple", "river"])
    assert score(words, "Apple, pineapple") == 0.5  # whole words, any case
    assert score(words, "") == 0.0


def test_press_configs_and_tasks_parse():
    assert PressConfig.parse("none").name is None
    p = PressConfig.parse("snapkv:0.75:window_size=32,kernel_size=3")
    assert (p.name, p.ratio, p.options) == ("snapkv", 0.75, {"window_size": 32, "kernel_size": 3})
    assert p.kwargs() == {"press": "snapkv", "compression_ratio": 0.75,
                          "press_options": {"window_size": 32, "kernel_size": 3}}
    assert PressConfig.parse("kivi::bits=4").label == "kivi:0:bits=4"
    assert parse_tasks("niah,ruler") == ["niah", *RULER]
    with pytest.raises(ValueError, match="unknown long-context task"):
        parse_tasks("nope")


def test_pipeline_on_a_tiny_model(engine, haystack, tmp_path):
    samples = make_samples(engine, haystack, ["niah", "fidelity"], [600], [0.0, 1.0], 1)
    presses = [PressConfig(None), PressConfig("snapkv", 0.5, {"window_size": 8}), PressConfig("kivi", 0.0,
                                                                                               {"residual": 16})]
    records = run(engine, samples, presses, max_new_tokens=8, progress=False)
    assert len(records) == 3 * 3
    for r in records:
        assert 0.0 <= r["score"] <= 1.0
        if r["press"] == "none":
            assert r["kv_bytes_final"] == r["kv_bytes_uncompressed"]
            if r["task"] == "fidelity":
                assert r["score"] == 1.0 and r["prefix"] == 1.0  # the uncompressed run against itself
        else:
            assert r["kv_bytes_final"] < 0.6 * r["kv_bytes_uncompressed"]
    rows = summary(records)
    assert {r["config"] for r in rows} == {"none", "snapkv:0.5:window_size=8", "kivi:0:residual=16"}
    written = report(records, tmp_path, {"test": True})
    assert {p.name for p in written} >= {"results.json", "summary.md", "niah_heatmap.png", "niah_by_ratio.png",
                                         "fidelity_by_ratio.png"}
    assert json.loads((tmp_path / "results.json").read_text())["meta"] == {"test": True}


def test_command_line(tmp_path):
    data = tmp_path / "data" / "long_context"
    data.mkdir(parents=True)
    (data / "PaulGrahamEssays_repo49.json").write_text(json.dumps({"text": TEXT}))
    out = subprocess.run([sys.executable, "-m", "decodekit.cli", "eval-long", "--model", "random:tiny-llama",
                          "--task", "niah", "--lengths", "500", "--depths", "0.5", "--samples", "1", "--presses",
                          "none,streaming_llm:0.5", "--max-new-tokens", "4", "--data-dir", str(tmp_path / "data"),
                          "--out", str(tmp_path / "out"), "--no-plot"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| niah |" in out.stdout and (tmp_path / "out" / "results.json").is_file()
    bad = subprocess.run([sys.executable, "-m", "decodekit.cli", "eval-long", "--model", "random:tiny-llama",
                          "--lengths", "5000", "--data-dir", str(tmp_path / "data")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 1 and "context window" in bad.stderr


@pytest.mark.real_model
@pytest.mark.slow
def test_gemma_finds_the_needle_uncompressed_with_kivi_and_with_snapkv_at_4x():
    """Gemma 3 270M (base), 1.5k tokens of essays, needles at four depths: 4/4 uncompressed, 4/4 with the KV cache
    held in 2-bit KIVI (at most a quarter of the bytes), and 4/4 with SnapKV keeping a quarter of the prompt's
    entries (kernel 15: a 5-digit needle is 5 tokens, the default kernel 5 keeps only its first digits)."""
    # Every entry kept in the window layers too: the presses' bytes are measured against the full cache (with rings
    # the window layers hold a fixed ring that no press shrinks; tests/engine/test_window_ring.py covers that).
    engine = decodekit.load("gemma3-270m", device="cpu", progress=False, window_ring=False)
    hay = Haystack.load(engine.tokenizer)
    samples = make_samples(engine, hay, ["niah"], [1500], [0.2, 0.4, 0.6, 0.8], 1)
    snap = PressConfig("snapkv", 0.75, {"kernel_size": 15})
    records = run(engine, samples, [PressConfig(None), PressConfig("kivi"), snap], max_new_tokens=12,
                  progress=False)
    for config in ("none", "kivi:0", snap.label):
        rs = [r for r in records if r["config"] == config]
        assert sum(r["score"] for r in rs) == 4, (config, [r["output"] for r in rs])
    assert all(r["kv_bytes_final"] <= r["kv_bytes_uncompressed"] / 4 for r in records if r["press"] == "kivi")
    # a quarter of the prompt's entries, plus the answer's own tokens (at most 12, in whole blocks of 16)
    assert all(r["kv_bytes_final"] <= r["kv_bytes_uncompressed"] * 0.27 for r in records if r["press"] == "snapkv")
