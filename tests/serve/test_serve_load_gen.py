"""bench/load_gen.py against the test server: a few requests per level, JSON out, loopback only."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from serve_helpers import TINY

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "load_gen.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=180)


def test_load_gen_reports_every_method_and_level(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?"}) + "\n" for i in range(5)))
    out = tmp_path / "load.json"
    p = run("--url", server.url, "--model", TINY, "--methods", "plain,pld", "--concurrency", "1,4", "--rate", "50",
            "--num-requests", "4", "--max-tokens", "8", "--dataset", str(data), "--out", str(out))
    assert p.returncode == 0, p.stderr
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert [(r["method"], r["mode"], r["level"]) for r in runs] == [
        (m, mode, level) for m in ("plain", "pld") for mode, level in (("concurrency", 1), ("concurrency", 4),
                                                                        ("rate", 50.0))]
    for r in runs:
        assert r["requests"] == 4 and r["errors"] == 0
        assert 4 <= r["output_tokens"] <= 32 and r["throughput_tok_s"] > 0
        assert 0 < r["ttft_s"]["p50"] <= r["ttft_s"]["p99"] <= r["latency_s"]["p99"]
    assert "tok/s" in p.stderr  # the table


def test_load_gen_counts_errors_and_refuses_remote_urls(server, tmp_path):
    data = tmp_path / "prompts.jsonl"
    data.write_text(json.dumps({"prompt": "hi"}) + "\n")
    p = run("--url", server.url, "--model", "not-served", "--concurrency", "2", "--num-requests", "3",
            "--max-tokens", "4", "--dataset", str(data))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)["runs"][0]
    assert r["requests"] == 0 and r["errors"] == 3 and "BadRequestError" in r["error_examples"][0]
    p = run("--url", "http://10.1.2.3:8000/v1", "--model", TINY)
    assert p.returncode != 0 and "loopback" in p.stderr
