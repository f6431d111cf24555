"""Eval JSON files (`decodekit eval --json`) as one markdown matrix: a row per run (greedy / sampling, then each
search strategy), a column per task, each cell the task's headline metric with its bootstrap interval. Files of the
same task share its column; where two files hold the same run, the later file's wins (a re-run after a failure).

    python3 bench/eval_matrix.py docs/results/quality-2026-11-24c/smollm2-h100-policy-*.json
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

PERCENT = ("accuracy", "pass@1")  # shown as percentages


def cell(run: dict, metric: str) -> str:
    if "error" in run:
        return "failed"
    m = run["metrics"][metric]
    if metric in PERCENT:
        return f"{100 * m['mean']:.0f} [{100 * m['ci_low']:.0f}, {100 * m['ci_high']:.0f}]"
    digits = 1 if m["mean"] >= 1 else 3
    return f"{m['mean']:.{digits}f} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"


def run_name(run: dict, meta: dict) -> str:
    if run["search"]:
        return run["search"]
    return "sampling" if meta["options"].get("temperature") else "greedy"


def matrix(paths: list[str]) -> str:
    tasks, cells, order = [], {}, []
    for path in paths:
        data = json.loads(Path(path).read_text())
        meta = data["meta"]
        metric = meta["metrics"][0]
        head = f"{meta['task']} ({metric}{', %' if metric in PERCENT else ''}, {meta['items']} items)"
        if head not in tasks:
            tasks.append(head)
        for run in data["runs"]:
            name = run_name(run, meta)
            if name not in order:
                order.append(name)
            cells[(name, head)] = cell(run, metric)
    lines = ["| run | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    lines += ["| " + name + " | " + " | ".join(cells.get((name, t), "not run") for t in tasks) + " |" for name in order]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(matrix(sys.argv[1:]))
