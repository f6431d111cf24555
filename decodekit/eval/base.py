"""What a task is: items from a data folder, a prompt per item (chat or completion), stop strings, a scorer.

A task is one file holding one `@register`ed dataclass subclass of `Task` (its fields are its knobs); the harness
(`runner.py`) does the rest: generation for each method, scoring, confidence intervals.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

@dataclass
class Item:
    id: str
    row: dict[str, Any]  # the data set's record, as read


@dataclass
class Task:
    """Base class. `metrics[0]` is the headline metric (with a bootstrap CI); `score` returns every metric of
    `metrics` for one completion, plus any details worth keeping (the extracted answer, the sandbox status)."""

    name: ClassVar[str] = ""
    metrics: ClassVar[tuple[str, ...]] = ()
    max_new_tokens: ClassVar[int] = 256  # the default budget of one answer

    def load(self, data_dir: Path) -> list[Item]:
        raise NotImplementedError

    def prompt(self, item: Item, chat: bool) -> str | list[dict[str, str]]:
        """The prompt for a chat model (`chat`: a user turn or messages) or a base model (text to continue)."""
        raise NotImplementedError

    def stop(self, chat: bool) -> list[str]:
        return []

    def score(self, item: Item, completion: str, chat: bool) -> dict[str, Any]:
        """Metrics of one completion (`chat`: it answered the chat prompt, else the completion prompt)."""
        raise NotImplementedError

    def corpus_scores(self, items: list[Item], completions: list[str]) -> dict[str, float]:
        """Metrics defined over the whole set rather than per item (corpus BLEU); none by default."""
        return {}


TASKS: dict[str, type[Task]] = {}


def register(cls: type[Task]) -> type[Task]:
    """Class decorator: make a task available by its `name` to `decodekit eval --task`."""
    TASKS[cls.name] = cls
    return cls


def make_task(name: str, **knobs: Any) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name](**knobs)


# ---- helpers shared by several tasks -------------------------------------------------------------------------
FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The code in a chat reply: the first fenced block tagged python (else the first fenced block; an unclosed
    fence runs to the end), or the whole reply when it has no fence."""
    blocks = FENCE.findall(text)
    for lang, body in blocks:
        if lang.lower() in ("python", "py", "python3"):
            return body
    return blocks[0][1] if blocks else text


DEFINITIONS = (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Assign,
               ast.AnnAssign)


def keep_definitions(code: str) -> str:
    """A chat reply's code without its top-level demo statements (example calls, prints, asserts, a `__main__`
    block), which would otherwise run before the tests and fail on their own: imports, functions, classes and
    assignments stay (as evalplus's sanitizer keeps them). Code that does not parse is returned unchanged."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return code
    kept = [node for node in tree.body if isinstance(node, DEFINITIONS)]
    return ast.unparse(ast.Module(body=kept, type_ignores=[])) + "\n" if len(kept) < len(tree.body) else code
