"""`decodekit eval` end to end on the tiny random model: the pipeline, the table, the JSON and the plots."""
from __future__ import annotations

import json

import pytest

from decodekit.cli import main

TINY = ["eval", "--model", "random:tiny-llama", "--device", "cpu", "--max-new-tokens", "8"]
PNG = b"\x89PNG\r\n\x1a\n"


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("task, style, metric", [("gsm8k", "chat", "accuracy"), ("humaneval", "base", "pass@1")])
def test_eval_writes_table_json_and_plot(capsys, tmp_path, data_dir, task, style, metric):
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    code, out, err = run(capsys, *TINY, "--task", task, "--limit", "2", "--methods", "plain,pld",
                         "--prompt-style", style, "--data-dir", str(data_dir), "--json", str(out_json),
                         "--plot", str(out_png))
    assert code == 0, err
    assert "plain" in out and "pld" in out and metric in out
    payload = json.loads(out_json.read_text())
    assert payload["meta"]["task"] == task and payload["meta"]["prompt_style"] == style
    assert payload["meta"]["items"] == 2 and payload["meta"]["metrics"][0] == metric
    assert [r["label"] for r in payload["runs"]] == ["plain", "pld"]
    for r in payload["runs"]:
        assert len(r["records"]) == 2 and set(r["metrics"][metric]) == {"mean", "ci_low", "ci_high"}
        assert 0.0 <= r["metrics"][metric]["mean"] <= 1.0 and r["tokens_per_s"] > 0
        assert all(1 <= rec["tokens"] <= 8 for rec in r["records"])
    # plain and pld decode greedily: the same completions (pld is lossless)
    assert [x["completion"] for x in payload["runs"][0]["records"]] == \
           [x["completion"] for x in payload["runs"][1]["records"]]
    assert out_png.read_bytes()[:8] == PNG


@pytest.mark.parametrize("sweep, labels", [
    (["temperature=0.5,1.0"], ["plain temperature=0.5", "plain temperature=1.0"]),
    (["temperature=0.5,1.0", "top_p=0.9,1.0"], ["plain temperature=0.5 top_p=0.9", "plain temperature=0.5 top_p=1.0",
                                               "plain temperature=1.0 top_p=0.9", "plain temperature=1.0 top_p=1.0"]),
])
def test_sweep(capsys, tmp_path, data_dir, sweep, labels):
    out_json, out_png = tmp_path / "s.json", tmp_path / "s.png"
    code, out, err = run(capsys, *TINY, "--task", "gsm8k", "--limit", "2", "--seed", "1", "--data-dir", str(data_dir),
                         "--sweep", *sweep, "--json", str(out_json), "--plot", str(out_png))
    assert code == 0, err
    payload = json.loads(out_json.read_text())
    assert [r["label"] for r in payload["runs"]] == labels
    assert payload["meta"]["sweep"] == {k: json.loads(f"[{v}]") for k, _, v in (s.partition("=") for s in sweep)}
    assert out_png.read_bytes()[:8] == PNG


def test_search_strategies_run_in_eval(capsys, tmp_path, data_dir):
    """Search strategies are runs like methods: knobs through -O reach generate, the label names the strategy."""
    out_json = tmp_path / "s.json"
    code, out, err = run(capsys, *TINY, "--task", "gsm8k", "--limit", "2", "--search", "none,beam,patience_beam", "--data-dir", str(data_dir), "--json", str(out_json))
    assert code == 0, err
    runs = json.loads(out_json.read_text())["runs"]
    assert [r["label"] for r in runs] == ["plain", "plain+beam", "plain+patience_beam"]  # `none`: the baseline
    assert runs[0]["search"] is None
    assert json.loads(out_json.read_text())["meta"]["runs_done"] == "3/3"  # written after each run


@pytest.mark.parametrize("extra, message", [
    (["--search", "nosuch"], "unknown search 'nosuch'"),  # one line, before any long run
    (["--search", "beam", "-O", "num_beamz=2"], "unknown option 'num_beamz' for search 'beam'"),
    (["--methods", "nosuch"], "unknown method 'nosuch'"),
    (["--limit", "0"], "--limit must be >= 1"),
    (["--kv-tokens", "0"], "--kv-tokens must be >= 1"),
    (["--sweep", "temperature"], "not KNOB=V1,V2"),
    (["--top-p", "2"], "top_p must be in (0, 1]"),
    (["--data-dir", "/no/such/folder"], "evaluation data folder not found: looked at /no/such/folder"),
])
def test_bad_input_is_one_line_error(capsys, data_dir, extra, message):
    argv = [*TINY, "--task", "gsm8k", "--limit", "1", "--data-dir", str(data_dir), *extra]
    code, _, err = run(capsys, *argv)
    last = err.strip().splitlines()[-1]  # the progress bar may precede it on stderr
    assert code == 1 and last.startswith("decodekit: error: ") and message in last, err


def test_a_failing_strategy_leaves_the_other_runs(capsys, tmp_path, data_dir):
    """Best-first beam keeps every open hypothesis's KV: in a small pool it fails part-way, and eval goes on with the
    next run, saves every run (the failed one with its error) and exits non-zero naming it."""
    out_json = tmp_path / "f.json"
    code, out, err = run(capsys, *TINY, "--task", "gsm8k", "--limit", "3", "--batch-size", "3", "--kv-tokens", "1000",
                         "--search", "none,best_first_beam,beam", "--data-dir", str(data_dir), "--json", str(out_json))
    assert code == 1 and "1 of 3 runs failed (plain+best_first_beam)" in err.strip().splitlines()[-1], err
    runs = json.loads(out_json.read_text())["runs"]
    assert [r["label"] for r in runs] == ["plain", "plain+best_first_beam", "plain+beam"]
    assert "KV pool is full" in runs[1]["error"] and runs[1]["records"] == []
    assert runs[2]["items"] == 3 and "failed: ValueError" in out
