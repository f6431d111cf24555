"""Grammar-backend micro-benchmark on JSONSchemaBench: coverage, compile time, per-token mask time.

For each backend and subset: how many schemas compile (coverage; a compile error is the backend refusing the
schema), the time to compile each one, and the time to fill one next-token mask, measured along random paths
that the masks themselves allow (`path_tokens` steps from the start; each step a uniformly random allowed
token other than EOS, stopping when only EOS is left). No model runs: this isolates the grammar engine's cost.
`decodekit bench-constrained` (after the engine integration) will print this dict.
"""
from __future__ import annotations

import gzip
import json
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .base import BACKENDS, allocate_bitmask, make_backend, unpack_bitmask
from .spec import constraint_spec

DATA_DIR = Path("/work/shared/data/jsonschemabench")  # offline copy of guidance-ai/jsonschemabench
_MAX_ERRORS_KEPT = 5


def load_schemas(data_dir: Path | str = DATA_DIR, subsets: Sequence[str] | None = None,
                 limit: int | None = None) -> dict[str, list[tuple[str, str]]]:
    """subset -> [(file name, schema JSON text)], the first `limit` of each (file order: reproducible)."""
    data_dir = Path(data_dir)
    files = sorted(data_dir.glob("*.jsonl.gz"))
    if not files:
        raise ValueError(f"no JSONSchemaBench files (*.jsonl.gz) in {data_dir}")
    available = [f.name.removesuffix(".jsonl.gz") for f in files]
    wanted = list(subsets) if subsets else available
    unknown = sorted(set(wanted) - set(available))
    if unknown:
        raise ValueError(f"unknown subset(s) {', '.join(unknown)}; available: {', '.join(available)}")
    out = {}
    for name in wanted:
        rows = []
        with gzip.open(data_dir / f"{name}.jsonl.gz", "rt", encoding="utf-8") as f:
            for line in f:
                if limit is not None and len(rows) >= limit:
                    break
                record = json.loads(line)
                rows.append((record["file"], record["json_schema"]))
        out[name] = rows
    return out


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _summary(compile_s: list[float], mask_s: list[float], n: int, errors: list[str]) -> dict[str, Any]:
    return {
        "schemas": n, "compiled": len(compile_s), "coverage": len(compile_s) / n if n else None,
        "compile_ms_p50": _ms(_percentile(compile_s, 0.5)), "compile_ms_p90": _ms(_percentile(compile_s, 0.9)),
        "compile_ms_mean": _ms(statistics.fmean(compile_s)) if compile_s else None,
        "mask_tokens": len(mask_s), "mask_us_p50": _us(_percentile(mask_s, 0.5)),
        "mask_us_p99": _us(_percentile(mask_s, 0.99)),
        "mask_us_mean": _us(statistics.fmean(mask_s)) if mask_s else None,
        "errors": errors[:_MAX_ERRORS_KEPT],
    }


def _ms(s: float | None) -> float | None:
    return None if s is None else round(s * 1e3, 3)


def _us(s: float | None) -> float | None:
    return None if s is None else round(s * 1e6, 1)


def _timed_walk(matcher, rng: random.Random, path_tokens: int, eos_ids: tuple[int, ...]) -> list[float]:
    """Seconds per mask fill along one random allowed path."""
    row = allocate_bitmask(1, matcher.vocab_size)[0]
    times = []
    for _ in range(path_tokens):
        start = time.perf_counter()
        matcher.fill_bitmask(row)
        times.append(time.perf_counter() - start)
        allowed = unpack_bitmask(row, matcher.vocab_size)
        allowed[list(eos_ids)] = False
        choices = allowed.nonzero().flatten().tolist()
        if not choices:
            break
        matcher.advance([rng.choice(choices)])
    return times


def bench_constrained(tokenizer: Any, eos_ids: Sequence[int], vocab_size: int,
                      backends: Sequence[str] = tuple(BACKENDS), data_dir: Path | str = DATA_DIR,
                      subsets: Sequence[str] | None = None, limit: int | None = 20, path_tokens: int = 32,
                      seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Coverage, compile time and mask time per backend and subset (see the module docstring); a dict for JSON.

    Compile time includes building the backend's matcher for the first time (what a request pays before its
    first token); the tokenizer binding is built once per backend beforehand and reported as `setup_s`.
    """
    schemas = load_schemas(data_dir, subsets, limit)
    result: dict[str, Any] = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "torch_threads":
        torch.get_num_threads(), "vocab_size": vocab_size, "limit": limit, "path_tokens": path_tokens,
        "subsets": list(schemas), "backends": {},
    }
    for name in backends:
        start = time.perf_counter()
        backend = make_backend(name, tokenizer, eos_ids, vocab_size)
        per_backend: dict[str, Any] = {"setup_s": round(time.perf_counter() - start, 3), "subsets": {}}
        all_compile, all_mask, all_errors, total = [], [], [], 0
        for subset, rows in schemas.items():
            rng = random.Random(f"{seed}:{subset}")  # the same walks' randomness for every backend
            compile_s, mask_s, errors = [], [], []
            for file, text in rows:
                try:
                    spec = constraint_spec(json_schema=text)
                    start = time.perf_counter()
                    matcher = backend.compile(spec).matcher()
                    compile_s.append(time.perf_counter() - start)
                except ValueError as e:
                    errors.append(f"{file}: {e}")
                    continue
                try:
                    mask_s += _timed_walk(matcher, rng, path_tokens, backend.eos_ids)
                except ValueError as e:  # the backend refused a token its own mask allowed: report it, go on
                    errors.append(f"{file}: mask and matcher disagree: {e}")
            if progress:
                print(f"{name} {subset}: {len(compile_s)}/{len(rows)} compiled", flush=True)
            per_backend["subsets"][subset] = _summary(compile_s, mask_s, len(rows), errors)
            all_compile += compile_s
            all_mask += mask_s
            all_errors += errors
            total += len(rows)
        per_backend["total"] = _summary(all_compile, all_mask, total, all_errors)
        result["backends"][name] = per_backend
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of `bench_constrained`'s result: one row per backend and subset, then totals."""
    head = f"{'backend':<11} {'subset':<16} {'coverage':>9} {'compile p50':>12} {'compile p90':>12} " \
           f"{'mask p50':>9} {'mask p99':>9}"
    lines = [head, "-" * len(head)]

    def fmt(v, unit):
        return "-" if v is None else f"{v:.1f}{unit}" if unit == "us" else f"{v:.2f}{unit}"

    for name, b in result["backends"].items():
        for subset, s in [*b["subsets"].items(), ("TOTAL", b["total"])]:
            lines.append(f"{name:<11} {subset:<16} {s['compiled']:>4}/{s['schemas']:<4} "
                         f"{fmt(s['compile_ms_p50'], 'ms'):>12} {fmt(s['compile_ms_p90'], 'ms'):>12} "
                         f"{fmt(s['mask_us_p50'], 'us'):>9} {fmt(s['mask_us_p99'], 'us'):>9}")
    return "\n".join(lines)
