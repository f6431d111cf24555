"""Benchmark prompts: Spec-Bench's question file or any JSONL with a `turns` list or a `prompt` field.

`spec_bench_sample.jsonl` (beside this file) holds the first two prompts of each of Spec-Bench's 13 categories
(hemingkx/Spec-Bench, `data/spec_bench/question.jsonl`, Apache-2.0), so that `--limit 1` or `--limit 2` works on
a machine without the full file.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator


@dataclass
class BenchPrompt:
    id: str
    category: str
    prompt: str  # the first user turn: Spec-Bench times single-turn answers here


SAMPLE = Path(__file__).with_name("spec_bench_sample.jsonl")
SAMPLE_PER_CATEGORY = 2


def spec_bench_path() -> Path:
    """The Spec-Bench question file: $DECODEKIT_SPEC_BENCH, else `shared/data/spec_bench/question.jsonl` found
    beside or above the working directory or this package, else the bundled sample."""
    if env := os.environ.get("DECODEKIT_SPEC_BENCH"):
        return Path(env)
    rel = Path("shared/data/spec_bench/question.jsonl")
    for base in [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]:
        for candidate in (base / rel, base.parent / rel):
            if candidate.is_file():
                return candidate
    return SAMPLE


def read_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) of each non-blank line; ValueError naming the line for one that is not JSON."""
    with open(path) as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield n, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None


def load_prompts(dataset: str, limit_per_category: int | None = None) -> list[BenchPrompt]:
    path = spec_bench_path() if dataset == "spec-bench" else Path(dataset)
    if path == SAMPLE and (limit_per_category is None or limit_per_category > SAMPLE_PER_CATEGORY):
        print(f"decodekit: Spec-Bench's question file not found (set DECODEKIT_SPEC_BENCH); using the bundled sample, "
              f"{SAMPLE_PER_CATEGORY} prompts per category", file=sys.stderr)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r} not found (use spec-bench or a .jsonl path)")
    prompts: list[BenchPrompt] = []
    per_category: dict[str, int] = {}
    for n, row in read_jsonl(path):
        if "turns" in row:
            text = row["turns"][0]
        elif "prompt" in row:
            text = row["prompt"]
        else:
            raise ValueError(f"{path}:{n}: a row needs a `turns` list or a `prompt` field")
        category = str(row.get("category", "all"))
        if limit_per_category is not None and per_category.get(category, 0) >= limit_per_category:
            continue
        per_category[category] = per_category.get(category, 0) + 1
        prompts.append(BenchPrompt(str(row.get("question_id", row.get("id", n))), category, text))
    if not prompts:
        raise ValueError(f"dataset {path} holds no prompts")
    return prompts
