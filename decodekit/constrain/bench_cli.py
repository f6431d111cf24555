"""`decodekit bench-constrained`: constrained decoding on JSONSchemaBench, end to end, both grammar backends.

Per backend and subset: coverage (schemas the backend compiles), compile time and per-token mask time (p50, p99;
`bench.bench_constrained`, along random allowed paths, no model), then real generation with the engine for each
compiled schema (greedy, the schema in a chat prompt) with each method: compliance (completed outputs that the
`jsonschema` validator accepts; outputs cut by --max-new-tokens are counted apart, never as matches), tokens/s
against unconstrained decoding of the same prompts with the same method, the host time spent on the grammar, and
the tokens that jump-forward supplied. Timings are decode rates (tokens after the first over the time after it),
one warm-up generation excluded.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from typing import Any, Callable

from .bench import DATA_DIR, bench_constrained, format_table, load_schemas

PROMPT = "Write one JSON object that follows this JSON schema. Reply with the JSON object only.\n\nSchema:\n{schema}"


def add_parser(sub, add_model_args: Callable[[argparse.ArgumentParser], None]) -> None:
    b = sub.add_parser("bench-constrained", help="constrained decoding on JSONSchemaBench: coverage, compliance, speed")
    add_model_args(b)
    b.add_argument("--subset", action="append", default=None,
                   help="JSONSchemaBench subset (repeatable; default: all), e.g. Github_easy, Glaiveai2K")
    b.add_argument("--limit", type=int, default=5, help="schemas per subset (the first ones, in file order)")
    b.add_argument("--backends", default="llguidance,xgrammar")
    b.add_argument("--methods", default="plain,pld", help="decoding methods, each constrained and unconstrained")
    b.add_argument("--max-new-tokens", type=int, default=256)
    b.add_argument("--max-prompt-tokens", type=int, default=2048, help="longer schema prompts are skipped")
    b.add_argument("--path-tokens", type=int, default=32, help="mask timings: steps along each random path")
    b.add_argument("--no-generate", action="store_true", help="coverage and grammar timings only (no model runs)")
    b.add_argument("--data", default=str(DATA_DIR), help="folder of the JSONSchemaBench *.jsonl.gz files")
    b.add_argument("--json", dest="json_out", default=None, metavar="OUT.json")
    b.add_argument("--markdown", default=None, metavar="OUT.md")
    b.set_defaults(func=run)


def _validator(schema_text: str):
    """A jsonschema validator for the schema (its own draft), or None if jsonschema cannot build one."""
    import jsonschema

    schema = json.loads(schema_text)
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        return cls(schema)
    except Exception:  # noqa: BLE001 - an unusual schema: its outputs are reported as unchecked
        return None


def check_output(text: str, validator) -> str:
    """"valid", "invalid" (not JSON, or rejected by the validator), or "unchecked" (the validator failed)."""
    import jsonschema

    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return "invalid"
    if validator is None:
        return "unchecked"
    try:
        validator.validate(value)
    except jsonschema.ValidationError:
        return "invalid"
    except Exception:  # noqa: BLE001 - e.g. a $ref to a remote document (no network here)
        return "unchecked"
    return "valid"


def _timed(engine, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> dict[str, Any]:
    from ..sampling import SamplingConfig

    r = engine.generate(prompt_ids, max_new_tokens, sampling=SamplingConfig(), **kwargs)  # greedy, no defaults
    s = r.stats
    return {"text": r.text, "finish_reason": r.finish_reason, "tokens": s.generated_tokens,
            "decode_s": max(s.total_time_s - s.time_to_first_token_s, 0.0), "ttft_s": s.time_to_first_token_s,
            "forward_passes": s.forward_passes, "jump_forward_tokens": s.jump_forward_tokens,
            "grammar_s": s.grammar_time_s, "grammar_masks": s.grammar_masks}


def _rate(runs: list[dict[str, Any]]) -> float | None:
    tokens = sum(max(r["tokens"] - 1, 0) for r in runs)
    seconds = sum(r["decode_s"] for r in runs)
    return round(tokens / seconds, 2) if seconds > 0 else None


def generate_runs(engine, schemas: dict[str, list[tuple[str, str]]], backends: list[str], methods: list[str],
                  max_new_tokens: int, max_prompt_tokens: int, progress: bool) -> dict[str, Any]:
    """Constrained and unconstrained generations per method (and per backend for the constrained ones)."""
    from .spec import constraint_spec

    prompts = []
    for subset, rows in schemas.items():
        for file, text in rows:
            ids = engine.encode(PROMPT.format(schema=text), chat=True)
            prompts.append((subset, file, text, ids))
    kept = [p for p in prompts if len(p[3]) <= max_prompt_tokens]
    out: dict[str, Any] = {"prompts": len(prompts), "skipped_long_prompts": len(prompts) - len(kept),
                           "unconstrained": {}, "constrained": {}}
    if kept:  # warm-up (lazy initialization, tokenizer bindings): not timed
        engine.generate(kept[0][3], 4)
        for b in backends:
            try:
                engine.generate(kept[0][3], 4, json_schema=kept[0][2], constraint_backend=b)
            except ValueError:
                pass
    for method in methods:
        runs = []
        for subset, file, text, ids in kept:
            runs.append({"subset": subset, "file": file, **_timed(engine, ids, max_new_tokens, method=method)})
        out["unconstrained"][method] = {"tok_s": _rate(runs), "runs": runs}
        if progress:
            print(f"unconstrained {method}: {_rate(runs)} tok/s", file=sys.stderr, flush=True)
    for backend in backends:
        out["constrained"][backend] = {}
        for method in methods:
            runs = []
            for subset, file, text, ids in kept:
                row: dict[str, Any] = {"subset": subset, "file": file}
                try:
                    spec = constraint_spec(json_schema=text)
                    engine.compile_constraint(spec, backend)
                except ValueError as e:
                    runs.append({**row, "compiled": False, "error": str(e)})
                    continue
                row.update(compiled=True, **_timed(engine, ids, max_new_tokens, method=method,
                                                   json_schema=text, constraint_backend=backend))
                row["check"] = check_output(row["text"], _validator(text)) if row["finish_reason"] == "stop" \
                    else "incomplete"
                runs.append(row)
            out["constrained"][backend][method] = _summarize(runs, out["unconstrained"][method]["runs"])
            if progress:
                s = out["constrained"][backend][method]
                print(f"{backend} {method}: {s['valid']}/{s['completed']} valid, {s['tok_s']} tok/s",
                      file=sys.stderr, flush=True)
    return out


def _summarize(runs: list[dict[str, Any]], plain_runs: list[dict[str, Any]]) -> dict[str, Any]:
    done = [r for r in runs if r.get("compiled")]
    same = {(r["subset"], r["file"]) for r in done}
    baseline = [r for r in plain_runs if (r["subset"], r["file"]) in same]
    count = {k: sum(r["check"] == k for r in done) for k in ("valid", "invalid", "unchecked", "incomplete")}
    completed = count["valid"] + count["invalid"] + count["unchecked"]
    tokens = sum(r["tokens"] for r in done)
    decode = sum(r["decode_s"] for r in done)
    return {
        "compiled": len(done), "completed": completed, **count,
        "compliance": round(count["valid"] / (count["valid"] + count["invalid"]), 4)
        if count["valid"] + count["invalid"] else None,
        "tok_s": _rate(done), "unconstrained_tok_s": _rate(baseline),
        "grammar_share": round(sum(r["grammar_s"] for r in done) / decode, 4) if decode else None,
        "grammar_us_per_token": round(1e6 * sum(r["grammar_s"] for r in done) / tokens, 1) if tokens else None,
        "jump_forward_share": round(sum(r["jump_forward_tokens"] for r in done) / tokens, 4) if tokens else None,
        "tokens_per_pass": round(tokens / sum(r["forward_passes"] for r in done), 3) if done else None,
        "runs": runs,
    }


def format_generation(gen: dict[str, Any]) -> str:
    head = (f"{'backend':<11} {'method':<8} {'compiled':>8} {'valid':>6} {'invalid':>7} {'unchk':>5} {'cut':>4} "
            f"{'tok/s':>7} {'free tok/s':>10} {'grammar %':>9} {'us/token':>8} {'jump %':>6} {'tok/pass':>8}")
    lines = [f"prompts: {gen['prompts']} ({gen['skipped_long_prompts']} skipped as too long)", head, "-" * len(head)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for backend, per_method in gen["constrained"].items():
        for method, s in per_method.items():
            lines.append(f"{backend:<11} {method:<8} {s['compiled']:>8} {s['valid']:>6} {s['invalid']:>7} "
                         f"{s['unchecked']:>5} {s['incomplete']:>4} {f(s['tok_s'], '.1f'):>7} "
                         f"{f(s['unconstrained_tok_s'], '.1f'):>10} "
                         f"{f(s['grammar_share'] and 100 * s['grammar_share'], '.1f'):>9} "
                         f"{f(s['grammar_us_per_token'], '.0f'):>8} "
                         f"{f(s['jump_forward_share'] and 100 * s['jump_forward_share'], '.0f'):>6} "
                         f"{f(s['tokens_per_pass'], '.2f'):>8}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> None:
    import torch

    backends = [b for b in args.backends.split(",") if b]
    methods = [m for m in args.methods.split(",") if m]
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    schemas = load_schemas(args.data, args.subset, args.limit)  # unknown subsets: one-line error, before loading
    import decodekit

    # Without the prefix cache, as `decodekit bench` runs: every run pays for its own prefill.
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, prefix_caching=False,
                            window_ring=not args.no_window_ring)
    result: dict[str, Any] = {
        "arguments": {k: v for k, v in vars(args).items() if k != "func"},
        "date": datetime.date.today().isoformat(), "machine": platform.platform(), "processor": platform.processor(),
        "device": str(engine.device), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "model": engine.name,
    }
    t0 = time.perf_counter()
    result["grammar"] = bench_constrained(engine.tokenizer, sorted(engine.eos_ids), engine.model.config.vocab_size,
                                          backends, args.data, args.subset, args.limit, args.path_tokens,
                                          progress=True)
    print(format_table(result["grammar"]))
    if not args.no_generate:
        result["generation"] = generate_runs(engine, schemas, backends, methods, args.max_new_tokens,
                                             args.max_prompt_tokens, progress=True)
        print(format_generation(result["generation"]))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write("```\n" + format_table(result["grammar"]) + "\n")
            if "generation" in result:
                f.write("\n" + format_generation(result["generation"]) + "\n")
            f.write("```\n")
