"""Eval results as a terminal table (rich), JSON, and PNG plots (matplotlib): a bar per run with its bootstrap
interval, or, for a sweep, quality against the knobs (a line per run family for one knob, a heatmap per family for
two, the mean over the other knobs per knob for more), as Shi et al. 2024 ("A Thorough Examination of Decoding
Methods in the Era of LLMs") plot theirs."""
from __future__ import annotations

import json
from dataclasses import asdict
from math import nan
from pathlib import Path
from typing import Any

from .runner import RunResult


def _fmt(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"


def print_table(summaries: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    head, *others = meta["metrics"]
    done = finished(summaries)
    corpus = list(done[0]["corpus"]) if done else []
    table = Table(title=f"{meta['task']} on {meta['model']} ({meta['device']}, {meta['prompt_style']} prompts), "
                        f"{meta['items']} items, {meta['max_new_tokens']} new tokens at most: {head} with a "
                        f"{meta['confidence']:.0%} bootstrap CI")
    for name in ["run", head, "CI", *others, *corpus, "tok/s", "tokens/answer", "truncated"]:
        table.add_column(name, justify="left" if name == "run" else "right", overflow="fold")
    for s in summaries:
        if "error" in s:  # a run that stopped: its error, in the metric's column
            table.add_row(s["label"], f"failed: {s['error']}", *[""] * (len(table.columns) - 2))
            continue
        m = s["metrics"]
        table.add_row(s["label"], _fmt(m[head]["mean"]), f"[{_fmt(m[head]['ci_low'])}, {_fmt(m[head]['ci_high'])}]",
                      *(_fmt(m[o]["mean"]) for o in others), *(_fmt(s["corpus"][c]) for c in corpus),
                      f"{s['tokens_per_s']:.1f}", f"{s['tokens_per_answer']:.1f}", f"{s['truncated']}/{s['items']}")
    Console().print(table)


def finished(summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that answered every item (a failed run has an `error` instead of figures)."""
    return [s for s in summaries if "error" not in s]


def write_json(path: str, meta: dict[str, Any], summaries: list[dict[str, Any]], results: list[RunResult]) -> None:
    payload = {"meta": meta, "runs": [{**summary, "records": [asdict(r) for r in result.records]}
                                      for summary, result in zip(summaries, results)]}
    Path(path).write_text(json.dumps(payload, indent=1, default=str))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(meta: dict[str, Any]) -> str:
    return f"{meta['task']}, {meta['model']} ({meta['items']} items, {meta['prompt_style']} prompts)"


def write_plot(path: str, summaries: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    """The headline metric per run, with its bootstrap interval as an error bar."""
    plt = _pyplot()
    head = meta["metrics"][0]
    summaries = finished(summaries)
    means = [s["metrics"][head]["mean"] for s in summaries]
    errors = [[m - s["metrics"][head]["ci_low"] for m, s in zip(means, summaries)],
              [s["metrics"][head]["ci_high"] - m for m, s in zip(means, summaries)]]
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(summaries) + 2), 4.5))
    ax.bar(range(len(summaries)), means, yerr=errors, capsize=5, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(summaries)), [s["label"] for s in summaries], rotation=30, ha="right")
    ax.set_ylabel(f"{head} ({meta['confidence']:.0%} bootstrap CI)")
    ax.set_title(_title(meta), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _family(s: dict[str, Any]) -> str:
    return s["method"] if s["search"] is None else f"{s['method']}+{s['search']}"


def write_sweep_plot(path: str, summaries: list[dict[str, Any]], sweep: dict[str, list[Any]],
                     meta: dict[str, Any]) -> None:
    """Quality against the swept knobs, one line (or heatmap) per method/search family."""
    plt = _pyplot()
    head = meta["metrics"][0]
    summaries = finished(summaries)
    knobs = list(sweep)
    families = list(dict.fromkeys(_family(s) for s in summaries))
    mean = lambda s: s["metrics"][head]["mean"]  # noqa: E731
    if len(knobs) == 2:
        a, b = knobs
        fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families) + 1, 4), squeeze=False)
        for ax, fam in zip(axes[0], families):
            grid = [[next((mean(s) for s in summaries if _family(s) == fam and s["knobs"] == {a: va, b: vb}), nan)
                     for vb in sweep[b]] for va in sweep[a]]
            image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    ax.text(j, i, _fmt(value), ha="center", va="center", color="white", fontsize=8)
            ax.set_xticks(range(len(sweep[b])), [str(v) for v in sweep[b]])
            ax.set_yticks(range(len(sweep[a])), [str(v) for v in sweep[a]])
            ax.set_xlabel(b)
            ax.set_ylabel(a)
            ax.set_title(fam, fontsize=10)
            fig.colorbar(image, ax=ax, label=head)
    else:
        fig, axes = plt.subplots(1, len(knobs), figsize=(4.5 * len(knobs) + 1, 4), squeeze=False)
        for ax, knob in zip(axes[0], knobs):
            for fam in families:
                points = [[s for s in summaries if _family(s) == fam and s["knobs"][knob] == v] for v in sweep[knob]]
                ys = [sum(mean(s) for s in group) / len(group) if group else nan for group in points]
                if len(knobs) == 1:  # exact points: each carries its own interval
                    errors = [[y - g[0]["metrics"][head]["ci_low"] if g else 0.0 for y, g in zip(ys, points)],
                              [g[0]["metrics"][head]["ci_high"] - y if g else 0.0 for y, g in zip(ys, points)]]
                    ax.errorbar(range(len(ys)), ys, yerr=errors, marker="o", capsize=4, label=fam)
                else:
                    ax.plot(range(len(ys)), ys, marker="o", label=fam)
            ax.set_xticks(range(len(sweep[knob])), [str(v) for v in sweep[knob]])
            ax.set_xlabel(knob)
            ax.set_ylabel(head if len(knobs) == 1 else f"{head} (mean over the other knobs)")
            ax.legend(fontsize=8)
    fig.suptitle(_title(meta), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
