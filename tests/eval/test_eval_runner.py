"""The harness loop against a scripted engine: what it asks of generate, and what it computes from the answers."""
from __future__ import annotations

import pytest
import torch

from decodekit.engine import GenerationResult, GenerationStats
from decodekit.eval import make_task
from decodekit.eval.runner import Run, evaluate, expand_runs, parse_sweep, summarize


class ScriptedEngine:
    """Answers each prompt with `reply(prompt)` and `tokens` tokens, and records every call."""

    device = torch.device("cpu")

    def __init__(self, reply, tokens: int = 5) -> None:
        self.reply, self.tokens, self.calls = reply, tokens, []

    def generate(self, prompts, max_new_tokens, **kwargs):
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, **kwargs})
        n = min(self.tokens, max_new_tokens)
        return [GenerationResult(self.reply(p), [7] * n, "length" if n == max_new_tokens else "stop",
                                 GenerationStats(generated_tokens=n)) for p in prompts]


def gsm8k_replies(prompt: str) -> str:
    """Right for the first and third toy problems, wrong for the second."""
    if "apples" in prompt:
        return "3 + 4 = 7\n#### 7"
    if "pens" in prompt:
        return "#### 1250"
    return "The answer is 30."


def test_scores_and_figures(data_dir):
    task = make_task("gsm8k")
    items = task.load(data_dir)
    engine = ScriptedEngine(gsm8k_replies)
    (result,) = evaluate(engine, task, items, [Run("plain")], 64, chat=True, show_progress=False)
    assert [r.scores["accuracy"] for r in result.records] == [1.0, 0.0, 1.0]
    assert [r.scores["extracted"] for r in result.records] == ["7", "1250", "30"]
    summary = summarize(task, items, result)
    acc = summary["metrics"]["accuracy"]
    assert acc["mean"] == pytest.approx(2 / 3) and 0.0 <= acc["ci_low"] <= acc["mean"] <= acc["ci_high"] <= 1.0
    assert summary["tokens_per_answer"] == 5 and summary["items"] == 3 and summary["truncated"] == 0
    assert summary["tokens_per_s"] == pytest.approx(15 / result.seconds)


def test_calls_warmup_batches_seeds_and_options(data_dir):
    task = make_task("gsm8k")
    items = task.load(data_dir)
    engine = ScriptedEngine(gsm8k_replies)
    runs = [Run("pld", "beam", {"temperature": 1.0})]
    evaluate(engine, task, items, runs, 64, chat=False, options={"temperature": 0.5, "seed": 5, "num_draft": 3},
             batch_size=2, show_progress=False)
    warmup, first, second = engine.calls
    assert warmup["max_new_tokens"] == 4 and len(warmup["prompts"]) == 1
    assert [len(c["prompts"]) for c in (first, second)] == [2, 1] and first["max_new_tokens"] == 64
    assert (first["sampling"].seed, second["sampling"].seed) == (5, 6)  # distinct, reproducible draws per call
    for call in (first, second):
        assert call["method"] == "pld" and call["search"] == "beam" and call["num_draft"] == 3
        assert call["sampling"].temperature == 1.0  # the sweep point overrides the common option
        assert call["sampling"].top_p == 1.0  # decodekit's default, not a model's generation_config.json
        assert "temperature" not in call and "seed" not in call  # sampling travels as one SamplingConfig
        assert call["chat"] is False and call["stop"] == ["Question:"]
    assert first["prompts"][0].endswith(f"Question: {items[0].row['question']}\nAnswer:")


def test_no_search_keyword_without_a_search(data_dir):
    task = make_task("gsm8k")
    engine = ScriptedEngine(gsm8k_replies)
    evaluate(engine, task, task.load(data_dir), [Run("plain")], 8, chat=True, show_progress=False)
    assert all("search" not in c and c["sampling"].seed is None and c["sampling"].greedy for c in engine.calls)


def test_bad_sampling_value_fails_before_generation(data_dir):
    task = make_task("gsm8k")
    engine = ScriptedEngine(gsm8k_replies)
    with pytest.raises(ValueError, match="top_p must be in"):
        evaluate(engine, task, task.load(data_dir), [Run("plain", knobs={"top_p": 1.5})], 8, chat=True,
                 show_progress=False)
    assert engine.calls == []


def test_a_rejected_run_fails_before_any_timed_generation(data_dir):
    task = make_task("gsm8k")

    class Rejecting(ScriptedEngine):
        def generate(self, prompts, max_new_tokens, **kwargs):
            if kwargs.get("search"):
                raise ValueError("unknown search 'beam'")
            return super().generate(prompts, max_new_tokens, **kwargs)

    engine = Rejecting(gsm8k_replies)
    with pytest.raises(ValueError, match="unknown search"):
        evaluate(engine, task, task.load(data_dir), [Run("plain"), Run("plain", "beam")], 8, chat=True,
                 show_progress=False)
    assert [c["max_new_tokens"] for c in engine.calls] == [4]  # only the first run's warm-up ran


def test_sweep_grid():
    grid = parse_sweep(["temperature=0.2,0.7", "top_p=0.9,1.0", "mode=fast"])
    assert grid == {"temperature": [0.2, 0.7], "top_p": [0.9, 1.0], "mode": ["fast"]}
    runs = expand_runs(["plain", "pld"], [None], {"temperature": [0.2, 0.7], "top_p": [0.9, 1.0]})
    assert len(runs) == 8 and runs[0].knobs == {"temperature": 0.2, "top_p": 0.9}
    assert runs[-1].label == "pld temperature=0.7 top_p=1.0"
    assert [r.label for r in expand_runs(["plain"], ["beam", None], {})] == ["plain+beam", "plain"]


@pytest.mark.parametrize("pairs, message", [
    (["temperature"], "not KNOB=V1,V2"), (["=1,2"], "not KNOB"), (["t=1", "t=2"], "given twice"),
])
def test_bad_sweep(pairs, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep(pairs)


class FailingSearchEngine(ScriptedEngine):
    """Fails every timed call of one search strategy (its warm-up call passes, as a pool-full error would)."""

    def generate(self, prompts, max_new_tokens, **kwargs):
        if kwargs.get("search") == "best_first_beam" and max_new_tokens > 4:
            raise ValueError("search 'best_first_beam': the KV pool is full")
        return super().generate(prompts, max_new_tokens, **kwargs)


def test_a_run_failing_midway_is_recorded_and_the_others_go_on(data_dir, tmp_path):
    from decodekit.eval.report import print_table, write_plot

    task = make_task("gsm8k")
    items = task.load(data_dir)
    runs = [Run("plain"), Run("plain", "best_first_beam"), Run("plain", "beam")]
    seen = []
    results = evaluate(FailingSearchEngine(gsm8k_replies), task, items, runs, 64, chat=True, show_progress=False,
                       on_run=lambda done: seen.append(len(done)))
    assert seen == [1, 2, 3] and [r.error is None for r in results] == [True, False, True]
    assert results[1].records == [] and "KV pool is full" in results[1].error
    summaries = [summarize(task, items, r) for r in results]
    assert summaries[1]["error"].startswith("ValueError: ") and "metrics" not in summaries[1]
    assert summaries[2]["metrics"]["accuracy"]["mean"] == pytest.approx(2 / 3)
    meta = {"task": "gsm8k", "model": "m", "device": "cpu", "prompt_style": "chat", "items": 3, "max_new_tokens": 64,
            "metrics": list(task.metrics), "confidence": 0.95}
    print_table(summaries, meta)  # a failed row prints its error, not figures
    write_plot(str(tmp_path / "p.png"), summaries, meta)  # the plot leaves the failed run out
    assert (tmp_path / "p.png").stat().st_size > 0
