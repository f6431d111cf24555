"""bench/head_step_times.py on the CPU (tiny model, untrained head): every decode step is timed and split."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from decodekit.bench.datasets import SAMPLE

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "head_step_times.py"


@pytest.fixture(scope="module")
def head_step_times():
    spec = importlib.util.spec_from_file_location("head_step_times", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["eagle", "medusa"])
def test_splits_every_decode_step(head_step_times, method, capsys):
    from decodekit.speculative import DRAFTERS
    from decodekit.speculative.heads_common import HeadDrafter

    args = ["--model", "random:tiny-llama", "--device", "cpu", "--dtype", "float32", "--method", method,
            "-O", "init=random", "--prompts", "2", "--new-tokens", "12", "--spec-bench", str(SAMPLE)]
    result = head_step_times.main(args)
    split = result["split"]
    assert len(result["median_step_ms"]) == 4 and result["median_step_ms"][0] > 0  # a warm step: captures excluded
    assert split.steps == len(split.per_step) >= 2 * 11 // 7  # each prompt's 11 tokens after the first
    assert 2 * 11 <= split.tokens <= 2 * 11 + 2 * 7  # the last step may commit past the end
    for total, verify, draft, head in split.per_step:
        assert 0 < head <= draft and verify > 0 and verify + draft <= total
    assert "propose" not in vars(DRAFTERS[method]) and "propose" in vars(HeadDrafter)  # the timers are gone
    out = capsys.readouterr().out
    assert f"{method}: {split.steps} steps" in out and "plain:" in out
