"""Step traces of real generations, recorded for `bench/trace_replay.py`: one JSON line per (method, prompt).

A line: `{"model", "method" (the bench spec, "name:k=v,..."), "prompt_id", "category", "generated", "trace"}` where
`trace` is `result.stats.trace` (`engine/trace.py`: per decode step the verify width, tree, accepted count and the
drafter's own passes).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from ..sampling import SamplingConfig
from .datasets import BenchPrompt, read_jsonl
from .runner import parse_method

FIELDS = ("model", "method", "prompt_id", "category", "generated", "trace")


def record(engine, model: str, methods: list[str], prompts: list[BenchPrompt], max_new_tokens: int,
           sampling: SamplingConfig | None = None, adaptive: bool | None = False) -> list[dict[str, Any]]:
    """Each method's trace on each prompt, decoded alone (batch 1: a trace is one sequence's steps). `adaptive`:
    the draft budget (default off: it decides from the recording machine's step costs, not the replay model's, so
    with it on a trace holds the small model's decisions to skip drafting)."""
    chat = bool(getattr(engine.tokenizer, "chat_template", None))  # a base model gets the raw prompt text
    lines = []
    for spec in methods:
        name, options = parse_method(spec)
        for p in prompts:
            r = engine.generate(p.prompt, max_new_tokens, method=name, method_options=options, chat=chat,
                                sampling=sampling, adaptive=adaptive, trace=True)
            lines.append({"model": model, "method": spec, "prompt_id": p.id, "category": p.category,
                          "generated": r.stats.generated_tokens, "trace": r.stats.trace})
    return lines


def write_traces(path: str | Path, lines: Iterable[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def read_traces(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a trace file; ValueError (one line) for a file that is not one."""
    lines = []
    for i, line in read_jsonl(path):
        missing = [k for k in FIELDS if k not in line]
        if missing or not isinstance(line["trace"], dict) or "steps" not in line["trace"]:
            raise ValueError(f"{path}:{i}: not a trace line (missing {', '.join(missing) or 'trace.steps'})")
        lines.append(line)
    if not lines:
        raise ValueError(f"{path}: no traces")
    return lines
