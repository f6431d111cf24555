"""Translation: Spec-Bench's 80 German-to-English items (WMT sentences with Spec-Bench's `reference`), chrF/BLEU.

Protocol. Chat models: the item's turn as is ("Translate German to English: <sentence>"); the whole reply is
scored. Base models: "German: <sentence>\\nEnglish:", stopped at the end of the line. Scoring with sacrebleu: chrF
per sentence is the headline metric (mean, with a bootstrap CI); BLEU per sentence (smoothed) and corpus-level
BLEU and chrF over the evaluated items are reported beside it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .base import Item, Task, register
from .summarization import spec_bench_items

PREFIX = "Translate German to English:"


def source_sentence(item: Item) -> str:
    turn = item.row["turns"][0]
    return turn[len(PREFIX):].strip() if turn.startswith(PREFIX) else turn


@register
@dataclass
class Translation(Task):
    name = "translation"
    metrics = ("chrF", "BLEU")
    max_new_tokens = 128

    def load(self, data_dir: Path) -> list[Item]:
        return spec_bench_items(data_dir, "translation")

    def prompt(self, item: Item, chat: bool) -> str:
        return item.row["turns"][0] if chat else f"German: {source_sentence(item)}\nEnglish:"

    def stop(self, chat: bool) -> list[str]:
        return [] if chat else ["\n"]

    def score(self, item: Item, completion: str, chat: bool) -> dict[str, Any]:
        from sacrebleu.metrics import BLEU, CHRF

        hypothesis, references = completion.strip(), [item.row["reference"][0]]
        return {"chrF": CHRF().sentence_score(hypothesis, references).score,
                "BLEU": BLEU(effective_order=True).sentence_score(hypothesis, references).score}

    def corpus_scores(self, items: list[Item], completions: list[str]) -> dict[str, float]:
        from sacrebleu.metrics import BLEU, CHRF

        hypotheses = [c.strip() for c in completions]
        references = [[item.row["reference"][0] for item in items]]
        return {"corpus BLEU": BLEU().corpus_score(hypotheses, references).score,
                "corpus chrF": CHRF().corpus_score(hypotheses, references).score}
