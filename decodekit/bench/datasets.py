"""Benchmark prompts: Spec-Bench's question file or any JSONL with a `turns` list or a `prompt` field."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class BenchPrompt:
    id: str
    category: str
    prompt: str  # the first user turn: Spec-Bench times single-turn answers here


def spec_bench_path() -> Path:
    """The Spec-Bench question file: $DECODEKIT_SPEC_BENCH, else `shared/data/spec_bench/question.jsonl` found
    beside or above the working directory or this package."""
    if env := os.environ.get("DECODEKIT_SPEC_BENCH"):
        return Path(env)
    rel = Path("shared/data/spec_bench/question.jsonl")
    for base in [Path.cwd(), *Path.cwd().parents, *Path(__file__).resolve().parents]:
        for candidate in (base / rel, base.parent / rel):
            if candidate.is_file():
                return candidate
    raise FileNotFoundError("Spec-Bench question file not found: set DECODEKIT_SPEC_BENCH or pass --dataset PATH.jsonl "
                            "(the file is shared/data/spec_bench/question.jsonl)")


def load_prompts(dataset: str, limit_per_category: int | None = None) -> list[BenchPrompt]:
    path = spec_bench_path() if dataset == "spec-bench" else Path(dataset)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r} not found (use spec-bench or a .jsonl path)")
    prompts: list[BenchPrompt] = []
    per_category: dict[str, int] = {}
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
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
