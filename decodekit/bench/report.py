"""Bench results as a terminal table, JSON, markdown and a PNG bar chart."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .runner import MethodRun


def summarize(runs: dict[str, MethodRun]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per method and category (plus "overall"): tokens/s, speedup over plain, tau, identical-to-plain count."""
    plain = {r.id: r for r in runs["plain"].runs}
    categories = sorted({r.category for r in runs["plain"].runs})
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for method, mr in runs.items():
        rows = {}
        for cat in [*categories, "overall"]:
            sel = [r for r in mr.runs if cat == "overall" or r.category == cat]
            if not sel:  # e.g. a slow external baseline timed on a subset of the prompts
                rows[cat] = None
                continue
            base = [plain[r.id] for r in sel]
            tokens, seconds = sum(r.new_tokens for r in sel), sum(r.seconds for r in sel)
            base_tps = sum(b.new_tokens for b in base) / max(sum(b.seconds for b in base), 1e-12)
            tps = tokens / max(seconds, 1e-12)
            steps = sum(r.decode_steps for r in sel)
            rows[cat] = {
                "prompts": len(sel),
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tps,
                "speedup": tps / base_tps,
                # tau: tokens committed per decode step; the first token comes from prefill.
                "tau": (tokens - len(sel)) / steps if steps and not method.startswith("hf") else None,
                "identical": sum(r.token_ids == plain[r.id].token_ids for r in sel),
                "draft_share": sum(r.draft_s for r in sel) / max(seconds, 1e-12),
            }
        summary[method] = rows
    return summary


def _cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "-"
    tau = f" ({row['tau']:.2f})" if row["tau"] is not None else ""
    return f"{row['speedup']:.2f}x{tau}"


def table_rows(summary) -> tuple[list[str], list[list[str]]]:
    """Categories down, methods across (a method column stays narrow however many categories there are)."""
    methods = list(summary)
    categories = list(next(iter(summary.values())))
    rows = [[cat, *(_cell(summary[m][cat]) for m in methods)] for cat in categories]
    rows.append(["tok/s", *(f"{summary[m]['overall']['tokens_per_s']:.1f}" for m in methods)])
    rows.append(["prompts", *(str(summary[m]["overall"]["prompts"]) for m in methods)])
    rows.append(["same as plain", *(f"{summary[m]['overall']['identical']}/{summary[m]['overall']['prompts']}"
                                    for m in methods)])
    return ["category", *methods], rows


def print_table(summary, meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table_rows(summary)
    table = Table(title=f"{meta['model']} on {meta['device']} ({meta['dtype']}), {meta['prompts']} prompts x "
                        f"{meta['max_new_tokens']} new tokens: speedup over plain (tau)")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row, end_section=row[0] == "overall")
    Console().print(table)


def markdown_table(summary) -> str:
    header, rows = table_rows(summary)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_markdown(path: str, summary, meta: dict[str, Any]) -> None:
    head = (f"Model `{meta['model']}` on {meta['device']} ({meta['dtype']}), {meta['prompts']} prompts from "
            f"{meta['dataset']}, {meta['max_new_tokens']} new tokens, median of {meta['repeats']} run(s). "
            "Cells: speedup over plain decoding in the same run (tau = tokens per target forward pass).\n\n")
    Path(path).write_text(head + markdown_table(summary) + "\n")


def write_json(path: str, runs: dict[str, MethodRun], summary, meta: dict[str, Any]) -> None:
    payload = {"meta": meta, "summary": summary,
               "methods": {m: {"accepted_by_position": r.accepted_by_position,
                               "prompts": [asdict(p) for p in r.runs]} for m, r in runs.items()}}
    Path(path).write_text(json.dumps(payload, indent=1))


def write_plot(path: str, summary, meta: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in summary if m != "plain"] or ["plain"]
    categories = list(next(iter(summary.values())))
    speed = lambda m, c: summary[m][c]["speedup"] if summary[m][c] else 0.0  # noqa: E731
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(8, len(categories) * 0.9), 4.5))
    for i, m in enumerate(methods):
        xs = [j + i * width for j in range(len(categories))]
        ax.bar(xs, [speed(m, c) for c in categories], width, label=m)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(categories))], categories, rotation=30, ha="right")
    ax.set_ylabel("speedup over plain decoding")
    ax.set_title(f"{meta['model']} on {meta['device']} ({meta['dtype']}), {meta['max_new_tokens']} new tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
