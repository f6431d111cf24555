"""Summarization: Spec-Bench's 80 summarization items (CNN/DailyMail articles, Spec-Bench's `reference`), ROUGE.

Protocol. Chat models: the item's turn as is ("Summarize: <article>"). Base models: the same text followed by
"\\n\\nSummary:", stopped at a blank line. Scoring: rouge-score's ROUGE-1/2/L F1 with the Porter stemmer against the
reference highlights; ROUGE-L is the headline metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from .base import Item, Task, register
from .data import read_jsonl


def spec_bench_items(data_dir: Path, category: str) -> list[Item]:
    rows = read_jsonl(data_dir / "spec_bench" / "question.jsonl")
    items = [Item(str(r["question_id"]), r) for r in rows if r.get("category") == category and r.get("reference")]
    if not items:
        raise ValueError(f"spec_bench/question.jsonl has no {category} items with a reference")
    return items


@register
@dataclass
class Summarization(Task):
    name = "summarization"
    metrics = ("rougeL", "rouge1", "rouge2")
    max_new_tokens = 256

    @cached_property
    def _scorer(self):
        from rouge_score import rouge_scorer

        return rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)

    def load(self, data_dir: Path) -> list[Item]:
        return spec_bench_items(data_dir, "summarization")

    def prompt(self, item: Item, chat: bool) -> str:
        turn = item.row["turns"][0]
        return turn if chat else f"{turn}\n\nSummary:"

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else ["\n\n"]

    def score(self, item: Item, completion: str, chat: bool) -> dict[str, Any]:
        scores = self._scorer.score(item.row["reference"][0], completion.strip())
        return {name: scores[name].fmeasure for name in self.metrics}
