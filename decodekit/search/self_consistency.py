"""Self-consistency (Wang et al. 2023, "Self-Consistency Improves Chain of Thought Reasoning in Language Models"):
sample n reasoning paths, extract each one's final answer, and return a sample whose answer the most samples
reached (the earliest such sample; its score is the answer's share of the votes).

Answers (`answer`): "auto" (the number after the last `####`, else the last `\\boxed{...}`, else the last number),
"number" (the last number), "boxed", "last_line", a regular expression (its first group, else the whole match, of
the last match), or a callable text -> answer | None. Answers vote together when math-verify finds them equal
(1/2 and 0.5), else when their normalized text is equal; samples without an answer do not vote.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from .base import SampleSearch, register

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (braces balanced)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def last_number(text: str) -> str | None:
    found = NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def auto_answer(text: str) -> str | None:
    if "####" in text:
        after = last_number(text.rsplit("####", 1)[1].split("\n")[0]) or None
        if after is not None:
            return after
    return last_boxed(text) or last_number(text)


def extractor(spec: Any) -> Callable[[str], str | None]:
    if callable(spec):
        return spec
    builtin = {"auto": auto_answer, "number": last_number, "boxed": last_boxed,
               "last_line": lambda t: next((line.strip() for line in reversed(t.splitlines()) if line.strip()), None)}
    if spec in builtin:
        return builtin[spec]
    try:
        pattern = re.compile(spec)
    except (re.error, TypeError):
        raise ValueError(f"self_consistency: answer must be auto, number, boxed, last_line, a regular expression or "
                         f"a callable, got {spec!r}") from None

    def by_pattern(text: str) -> str | None:
        found = list(pattern.finditer(text))
        if not found:
            return None
        m = found[-1]
        return m.group(1) if m.groups() else m.group(0)

    return by_pattern


def normalize(answer: str) -> str:
    return " ".join(answer.strip().strip(".").replace(",", "").split()).lower()


def same_answer(a: str, b: str) -> bool:
    if normalize(a) == normalize(b):
        return True
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    pa, pb = parse(a), parse(b)
    return bool(pa and pb and verify(pa, pb))


def vote(answers: list[str | None]) -> tuple[list[int], float]:
    """The samples whose answer won the majority vote (ties: the answer reached first), and its vote share."""
    groups: list[list[int]] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        home = next((g for g in groups if same_answer(answers[g[0]], a)), None)
        if home is None:
            groups.append([i])
        else:
            home.append(i)
    if not groups:
        return [], 0.0
    best = max(groups, key=len)  # max keeps the first of equally large groups
    return best, len(best) / len(answers)


@register
@dataclass
class SelfConsistency(SampleSearch):
    """Knobs (defaults): `n` (8 samples), `answer` ("auto"; see the module), `arithmetic` (False)."""

    name = "self_consistency"
    answer: Any = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.extract = extractor(self.answer)

    def scores(self, engine, req, results, seqs) -> list[float]:
        answers = [self.extract(r.text) for r in results]
        winners, share = vote(answers)
        # The winning answer's samples score its vote share (the earliest of them is chosen), the others 0.
        return [share if i in winners else 0.0 for i in range(len(results))]
