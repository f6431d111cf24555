"""The harness: every run (a method, or a search strategy, at one point of the sweep grid) over the same items,
through the public `engine.generate` only; then scores, bootstrap intervals, tokens/s and tokens per answer.

Timing: tokens/s of a run is its generated tokens over the wall time of its `generate` calls (scoring excluded),
after one short untimed call per run that also checks the method, search and options before anything long runs.
A list of `batch_size` prompts goes to each call; whether the engine batches them is its business.

Sampling: an explicit `SamplingConfig` per run (decodekit's defaults, greedy, under the caller's values and the
run's sweep knobs), so the model's generation_config.json does not change the protocol from one model to the next
(as in `decodekit bench`); every other option goes to generate as a keyword (method knobs, search options).
"""
from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from ..sampling import SamplingConfig
from .base import Item, Task
from .stats import bootstrap_ci

SAMPLING_FIELDS = {f.name for f in fields(SamplingConfig)}

WARMUP_TOKENS = 4


@dataclass
class Run:
    """One column of the comparison."""

    method: str = "plain"
    search: str | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # this sweep point: sampling fields or method options

    @property
    def label(self) -> str:
        name = self.method if self.search is None else f"{self.method}+{self.search}"
        return " ".join([name, *(f"{k}={v}" for k, v in self.knobs.items())])


@dataclass
class ItemRecord:
    id: str
    completion: str
    tokens: int
    finish_reason: str
    seconds: float  # this item's share of its generate call: the call's wall time over the prompts in it
    scores: dict[str, Any]


@dataclass
class RunResult:
    run: Run
    records: list[ItemRecord] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the generate calls
    error: str | None = None  # why the run stopped part-way (its records are dropped: not every item was answered)


def parse_sweep(pairs: list[str]) -> dict[str, list[Any]]:
    """`["temperature=0.2,0.7", "top_p=0.9,1.0"]` -> {"temperature": [0.2, 0.7], "top_p": [0.9, 1.0]}."""
    grid: dict[str, list[Any]] = {}
    for pair in pairs:
        key, eq, values = pair.partition("=")
        key = key.strip()
        if not eq or not key or not values.strip():
            raise ValueError(f"sweep {pair!r} is not KNOB=V1,V2,...")
        if key in grid:
            raise ValueError(f"sweep knob {key!r} given twice")
        grid[key] = [_value(v.strip()) for v in values.split(",") if v.strip()]
    return grid


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def expand_runs(methods: list[str], searches: list[str | None], sweep: dict[str, list[Any]]) -> list[Run]:
    """Every method x search strategy x point of the sweep grid, in that order."""
    if not methods:
        raise ValueError("--methods needs at least one method")
    points = [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())] if sweep else [{}]
    return [Run(m, s, p) for m in methods for s in searches for p in points]


def _call_kwargs(run: Run, options: dict[str, Any], chat: bool, stop: list[str]) -> dict[str, Any]:
    """generate's keyword arguments for a run: its SamplingConfig (validated here) and every other option."""
    merged = {**options, **run.knobs}
    sampling = SamplingConfig(**{k: v for k, v in merged.items() if k in SAMPLING_FIELDS}).validate()
    kwargs = {k: v for k, v in merged.items() if k not in SAMPLING_FIELDS}
    kwargs.update(method=run.method, sampling=sampling, chat=chat, stop=stop)
    if run.search is not None:
        kwargs["search"] = run.search  # a strategy over whole sequences: passed through, the engine decides
    return kwargs


def evaluate(engine, task: Task, items: list[Item], runs: list[Run], max_new_tokens: int, chat: bool,
             options: dict[str, Any] | None = None, batch_size: int = 1, show_progress: bool = True,
             on_run: Callable[[list[RunResult]], None] | None = None) -> list[RunResult]:
    """Generate and score every item for every run. `options`: sampling fields (temperature, seed, ...) and
    keyword arguments of every generate call (method or search options); a run's sweep knobs override them.
    A seed S gives the k-th call of a run seed S + k (distinct draws per item, reproducible). `on_run` is called
    with the finished runs after each one (the CLI saves them: a long evaluation cut short keeps what it did).
    A run that raises once timed generation has begun (e.g. a search that fills the KV pool on this batch) is
    recorded with its error and the next run goes on: one strategy's failure does not lose the others' results."""
    from tqdm.auto import tqdm

    if not items:
        raise ValueError("no items to evaluate")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    options = dict(options or {})
    stop = task.stop(chat)
    prompts = [task.prompt(item, chat) for item in items]
    for run in runs:  # fail fast on a bad method, search or option, and warm up (not timed)
        engine.generate(prompts[:1], min(WARMUP_TOKENS, max_new_tokens), **_call_kwargs(run, options, chat, stop))
    results = []
    bar = tqdm(total=len(items) * len(runs), disable=not show_progress, unit="item")
    for run in runs:
        bar.set_description(run.label)
        kwargs = _call_kwargs(run, options, chat, stop)
        result = RunResult(run)
        try:
            _generate_run(engine, task, items, prompts, result, kwargs, max_new_tokens, chat, batch_size, bar)
        except Exception as e:  # noqa: BLE001 - reported with the run, which stops; the evaluation goes on
            result.records, result.error = [], f"{type(e).__name__}: {e}"
            bar.write(f"decodekit: run {run.label!r} failed: {result.error}")
        results.append(result)
        if on_run is not None:
            on_run(results)
    bar.close()
    return results


def _generate_run(engine, task: Task, items: list[Item], prompts: list, result: RunResult, kwargs: dict[str, Any],
                  max_new_tokens: int, chat: bool, batch_size: int, bar) -> None:
    """A run's timed generate calls over every item, `batch_size` prompts a call, scored into `result`."""
    for k, start in enumerate(range(0, len(items), batch_size)):
        chunk = slice(start, start + batch_size)
        call = dict(kwargs)
        if call["sampling"].seed is not None:
            call["sampling"] = replace(call["sampling"], seed=call["sampling"].seed + k)
        t0 = time.perf_counter()
        outputs = engine.generate(prompts[chunk], max_new_tokens, **call)
        seconds = time.perf_counter() - t0
        if len(outputs) != len(prompts[chunk]):
            raise RuntimeError(f"generate returned {len(outputs)} results for {len(prompts[chunk])} prompts")
        result.seconds += seconds
        for item, out in zip(items[chunk], outputs):
            result.records.append(ItemRecord(item.id, out.text, out.stats.generated_tokens, out.finish_reason,
                                             seconds / len(outputs), task.score(item, out.text, chat)))
        bar.update(len(outputs))


def summarize(task: Task, items: list[Item], result: RunResult, confidence: float = 0.95) -> dict[str, Any]:
    """A run's figures: each metric's mean with a bootstrap interval, corpus metrics, tokens/s, tokens per answer."""
    if result.error is not None:
        return {"label": result.run.label, "method": result.run.method, "search": result.run.search,
                "knobs": result.run.knobs, "items": 0, "error": result.error}
    records = result.records
    metrics = {}
    for name in task.metrics:
        values = [float(r.scores[name]) for r in records]
        low, high = bootstrap_ci(values, confidence)
        metrics[name] = {"mean": sum(values) / len(values), "ci_low": low, "ci_high": high}
    tokens = sum(r.tokens for r in records)
    by_id = {r.id: r.completion for r in records}
    return {
        "label": result.run.label, "method": result.run.method, "search": result.run.search,
        "knobs": result.run.knobs, "items": len(records), "metrics": metrics,
        "corpus": task.corpus_scores(items, [by_id[item.id] for item in items]),
        "tokens_per_s": tokens / result.seconds if result.seconds > 0 else 0.0,
        "tokens_per_answer": tokens / len(records),
        "truncated": sum(r.finish_reason == "length" for r in records),  # answers cut by max_new_tokens
        "seconds": result.seconds,
    }
