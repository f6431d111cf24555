"""bench/tp_bench.py's logic on the CPU (gloo, tiny shape): runs over 1 and 2 ranks, the weight bytes, the floor."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch.distributed as dist

import decodekit

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "tp_bench.py"


@pytest.fixture(scope="module")
def tp_bench():
    spec = importlib.util.spec_from_file_location("tp_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_and_weight_bytes(tp_bench):
    assert tp_bench.parse_runs(["llama3-70b:2,4", "tiny-llama"]) == [("llama3-70b", 2), ("llama3-70b", 4),
                                                                     ("tiny-llama", 1)]
    with pytest.raises(ValueError):
        tp_bench.parse_runs(["no-such-shape:2"])
    import torch

    model = decodekit.load("random:tiny-llama", device="cpu", dtype="float32").model
    assert tp_bench.weight_bytes("tiny-llama", torch.float32) == sum(p.numel() * 4 for p in model.parameters())
    # the 70B shape: 70.6e9 parameters (untied head), bf16
    assert abs(tp_bench.weight_bytes("llama3-70b", torch.bfloat16) / 2 - 70.55e9) < 0.05e9


def test_tiny_runs_on_one_and_two_cpu_ranks(tp_bench, tmp_path):
    results = tp_bench.main(["--runs", "tiny-llama:1,2", "--device", "cpu", "--dtype", "float32", "--prompt-len",
                             "8", "--new-tokens", "8", "--repeats", "1", "--bandwidth", "10", "--out",
                             str(tmp_path)])
    assert [(r["shape"], r["world"]) for r in results] == [("tiny-llama", 1), ("tiny-llama", 2)]
    one, two = results
    for r in results:
        assert r["tok_s"] > 0
        assert r["floor_tok_s"] == pytest.approx(r["world"] * 10e9 / r["weight_bytes"])
        assert r["fraction_of_floor"] == pytest.approx(r["tok_s"] / r["floor_tok_s"])
    assert one["rank0_weight_bytes"] == one["weight_bytes"]
    assert two["rank0_weight_bytes"] < 0.6 * one["weight_bytes"]  # rank 0 holds about half (norms replicated)
    saved = json.loads((tmp_path / "tp_bench.json").read_text())
    assert saved["runs"] == results
    assert not dist.is_initialized()
