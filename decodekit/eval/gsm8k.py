"""GSM8K (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems"): grade-school math, exact answer.

Protocol. Chat models: zero-shot, one user turn asking for step-by-step reasoning and the final answer after
`####` (GSM8K's own answer marker). Base models: `num_fewshot` worked examples from the train split (the first
ones, for a deterministic prompt; calculator notes `<<...>>` removed) as `Question: ...\\nAnswer: ...`, stopped at
the next `Question:` (lm-evaluation-harness's completion format). Scoring: the answer is the first number after the
last `####`, else the last number of the reply (lm-evaluation-harness's "flexible extract"); math-verify compares it
with the reference number after `#### `.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .base import Item, Task, register
from .data import read_jsonl

CHAT_INSTRUCTION = ("Solve the following math problem step by step. Then write the final answer, a number, on the "
                    "last line after '####', like this: #### 42")
NUMBER = re.compile(r"-?\$?\d+(?:,\d{3})*(?:\.\d+)?")
CALCULATOR_NOTE = re.compile(r"<<[^>]*>>")


def reference_answer(solution: str) -> str:
    """The number after GSM8K's `#### ` marker, thousands separators removed."""
    if "####" not in solution:
        raise ValueError(f"GSM8K answer has no '####' marker: {solution[-60:]!r}")
    return solution.rsplit("####", 1)[1].strip().replace(",", "")


def extract_answer(reply: str) -> str | None:
    """The model's final answer: the first number after the last `####`, else the last number in the reply."""
    if "####" in reply and (found := NUMBER.search(reply.rsplit("####", 1)[1])):
        return found.group()
    numbers = NUMBER.findall(reply)
    return numbers[-1] if numbers else None


def is_correct(predicted: str | None, reference: str) -> bool:
    from math_verify import parse, verify

    if predicted is None:
        return False
    predicted = re.sub(r"(?<=\d),(?=\d{3}\b)", "", predicted)  # 1,000 -> 1000
    return bool(verify(parse(reference), parse(predicted)))


@register
@dataclass
class GSM8K(Task):
    num_fewshot: int = 5  # worked examples in a base model's prompt
    name = "gsm8k"
    metrics = ("accuracy",)
    max_new_tokens = 256

    def load(self, data_dir: Path) -> list[Item]:
        self._folder = data_dir / "gsm8k"
        return [Item(str(i), row) for i, row in enumerate(read_jsonl(self._folder / "test.jsonl"))]

    @cached_property
    def _shots(self) -> str:
        """The worked examples a base model's prompt starts with (read once, only when needed)."""
        train = read_jsonl(self._folder / "train.jsonl.gz")[:self.num_fewshot] if self.num_fewshot else []
        return "".join(f"Question: {r['question']}\nAnswer: {CALCULATOR_NOTE.sub('', r['answer'])}\n\n"
                       for r in train)

    def prompt(self, item: Item, chat: bool) -> str:
        question = item.row["question"]
        if chat:
            return f"{CHAT_INSTRUCTION}\n\nProblem: {question}"
        return f"{self._shots}Question: {question}\nAnswer:"

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else ["Question:"]

    def score(self, item: Item, completion: str, chat: bool) -> dict[str, Any]:
        predicted = extract_answer(completion)
        reference = reference_answer(item.row["answer"])
        return {"accuracy": float(is_correct(predicted, reference)), "extracted": predicted, "reference": reference}
