"""MBPP (Austin et al. 2021, "Program Synthesis with Large Language Models"), the hand-verified sanitized set.

Split: the test split as the MBPP convention defines it, task ids 11-510 (257 problems of the sanitized file; ids
1-10 are the few-shot prompt pool, 511-600 validation, 601-974 train). Protocol. Base models: the paper's 3-shot
prompt (tasks 2, 3 and 4) - "You are an expert Python programmer, and here is your task: {text} Your code should
pass these tests:" with the tests, then the code between `[BEGIN]` and `[DONE]`, stopped at `[DONE]`. Chat models:
the task and its tests in one user turn, asking for the code in a fenced block (extracted, without top-level demo
statements). The program is the test imports, the code, and the test asserts, run in the sandbox; pass@1 = it exits
cleanly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Item, Task, extract_code, keep_definitions, register
from .data import read_jsonl
from .sandbox import SandboxLimits, run_python

TEST_IDS = range(11, 511)
FEWSHOT_IDS = (2, 3, 4)


def task_text(row: dict[str, Any]) -> str:
    tests = "\n".join(row["test_list"])
    return (f"You are an expert Python programmer, and here is your task: {row['prompt']} "
            f"Your code should pass these tests:\n\n{tests}\n")


def program(row: dict[str, Any], code: str) -> str:
    return "\n".join([*row.get("test_imports", []), code, "", *row["test_list"], ""])


@register
@dataclass
class MBPP(Task):
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    name = "mbpp"
    metrics = ("pass@1",)
    max_new_tokens = 384

    def load(self, data_dir: Path) -> list[Item]:
        rows = read_jsonl(data_dir / "mbpp" / "sanitized-mbpp.jsonl")
        by_id = {row["task_id"]: row for row in rows}
        missing = [i for i in FEWSHOT_IDS if i not in by_id]
        if missing:
            raise ValueError(f"sanitized-mbpp.jsonl lacks the few-shot tasks {missing}")
        self._shots = "".join(f"{task_text(by_id[i])}[BEGIN]\n{by_id[i]['code']}\n[DONE]\n\n" for i in FEWSHOT_IDS)
        return [Item(str(row["task_id"]), row) for row in rows if row["task_id"] in TEST_IDS]

    def prompt(self, item: Item, chat: bool) -> str:
        if chat:
            return f"{task_text(item.row)}\nWrite the Python code in one ```python block."
        return f"{self._shots}{task_text(item.row)}[BEGIN]\n"

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else ["[DONE]"]

    def score(self, item: Item, completion: str, chat: bool) -> dict[str, Any]:
        code = keep_definitions(extract_code(completion)) if chat else completion
        result = run_python(program(item.row, code), self.limits)
        return {"pass@1": float(result.passed), "status": result.status, "detail": result.detail()}
