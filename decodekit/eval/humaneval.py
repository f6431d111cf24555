"""HumanEval (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): 164 Python functions, pass@1.

Protocol. Base models: the problem's prompt as is (signature and docstring), stopped at the Codex paper's stop
sequences; the program is prompt + completion. Chat models: one user turn with the prompt in a code fence, asking
for the whole function in a fenced block; the program is the prompt (its imports and helper functions) followed by
the extracted code without its top-level demo statements (`keep_definitions`), or prompt + code when the reply holds
only the body. Then the problem's tests and `check(entry_point)` run in the sandbox (`sandbox.py`); pass@1 = the
program exits cleanly (one sample per problem).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import Item, Task, extract_code, keep_definitions, register
from .data import read_jsonl
from .sandbox import SandboxLimits, run_python

CHAT_INSTRUCTION = "Complete the following Python function. Reply with the complete function in one ```python block."
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]  # Chen et al. 2021, section 2.3


def program(item: Item, completion: str, chat: bool) -> str:
    """The program the sandbox runs: the function (prompt + completion, or the prompt and the chat reply's code),
    the problem's tests, and the call of `check` on the entry point."""
    prompt, entry = item.row["prompt"], item.row["entry_point"]
    if chat:
        code = extract_code(completion)
        if re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M):
            body = f"{prompt}\n\n{keep_definitions(code)}"
        else:  # only the body: it continues the prompt
            body = prompt + code
    else:
        body = prompt + completion
    return f"{body}\n\n{item.row['test']}\n\ncheck({entry})\n"


@register
@dataclass
class HumanEval(Task):
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    name = "humaneval"
    metrics = ("pass@1",)
    max_new_tokens = 384

    def load(self, data_dir: Path) -> list[Item]:
        return [Item(row["task_id"], row) for row in read_jsonl(data_dir / "humaneval" / "HumanEval.jsonl")]

    def prompt(self, item: Item, chat: bool) -> str:
        if chat:
            return f"{CHAT_INSTRUCTION}\n\n```python\n{item.row['prompt']}```"
        return item.row["prompt"]

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else list(STOP)

    def score(self, item: Item, completion: str, chat: bool) -> dict[str, Any]:
        result = run_python(program(item, completion, chat), self.limits)
        return {"pass@1": float(result.passed), "status": result.status, "detail": result.detail()}
