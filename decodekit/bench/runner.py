"""`decodekit bench`: methods side by side on one model in one process, Spec-Bench style.

Each method decodes every prompt (each first once untimed: a warm-up); a prompt's time is the median
of `repeats` runs, with the device synchronized. Speedup is the method's tokens/s over plain decoding's measured
in the same run; `identical` counts prompts whose token ids equal plain decoding's.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..sampling import SamplingConfig
from .datasets import BenchPrompt, load_prompts


@dataclass
class PromptRun:
    id: str
    category: str
    seconds: float
    new_tokens: int
    decode_steps: int
    token_ids: list[int]
    draft_s: float = 0.0
    verify_s: float = 0.0


@dataclass
class MethodRun:
    method: str
    runs: list[PromptRun] = field(default_factory=list)
    accepted_by_position: list[float] = field(default_factory=list)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(fn: Callable[[], Any], repeats: int, device: torch.device) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def run_method(engine, method: str, prompts: list[BenchPrompt], max_new_tokens: int, sampling: SamplingConfig,
               repeats: int, progress=None, batch_size: int = 1) -> MethodRun:
    """Each prompt decoded alone, or `batch_size` prompts at a time as one batch on the core (then every prompt of
    a batch is charged the batch's time divided by its size: the tokens/s of a method are those of its batches)."""
    name, options = parse_method(method)
    adaptive = options.pop("adaptive", None)  # "name:adaptive=false": full drafts, no draft budget
    chat = bool(getattr(engine.tokenizer, "chat_template", None))  # a base model gets the raw prompt text
    gen = lambda ps: engine.generate([p.prompt for p in ps], max_new_tokens, method=name,  # noqa: E731
                                     sampling=sampling, chat=chat, method_options=options, adaptive=adaptive)
    result = MethodRun(method)
    acc_sum: list[float] = []
    for b in range(0, len(prompts), batch_size):
        chunk = prompts[b:b + batch_size]
        # Warm-up of each batch, untimed: a new prompt length or KV size can mean a graph capture or a compilation
        # (seconds on a GPU), which a median of few runs would not always drop.
        gen(chunk)
        seconds, results = time_runs(lambda: gen(chunk), repeats, engine.device)
        for p, r in zip(chunk, results):
            s = r.stats
            result.runs.append(PromptRun(p.id, p.category, seconds / len(chunk), s.generated_tokens, s.decode_steps,
                                         r.token_ids, s.draft_time_s, s.verify_time_s))
            for i, a in enumerate(s.accepted_by_position):
                acc_sum.extend([0.0] * (i + 1 - len(acc_sum)))
                acc_sum[i] += a
            if progress is not None:
                progress()
    result.accepted_by_position = [a / len(prompts) for a in acc_sum]
    return result


def run_hf_baseline(engine, kind: str, prompts: list[BenchPrompt], max_new_tokens: int, repeats: int,
                    progress=None) -> MethodRun:
    """transformers' own `generate` on the same weights: greedy (`hf`) or prompt lookup (`hf-pld`)."""
    from .hf_baselines import hf_generate

    result = MethodRun(kind)
    hf_generate(engine, kind, prompts[0], max_new_tokens)  # warm-up
    for p in prompts:
        seconds, ids = time_runs(lambda: hf_generate(engine, kind, p, max_new_tokens), repeats, engine.device)
        result.runs.append(PromptRun(p.id, p.category, seconds, len(ids), len(ids), ids))
        if progress is not None:
            progress()
    return result


def _value(text: str) -> Any:
    """A method option's value as the CLI's `-O` reads it: JSON (numbers, true / false), else the text."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """"name:k=v,k=v" (the bench's method spec) -> (name, options)."""
    name, _, opts = spec.partition(":")
    options = dict(kv.split("=", 1) for kv in opts.split(",")) if opts else {}
    return name, {k: _value(v) for k, v in options.items()}


def split_methods(text: str) -> list[str]:
    """A list of method specs: separated by ";" if there is one, else by commas, where a part "k=v" without a
    method name continues the spec before it ("plain,pld:num_draft=4,on_device=true,eagle": three specs)."""
    if ";" in text:
        return [m.strip() for m in text.split(";") if m.strip()]
    specs: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if specs and "=" in part and ":" not in part:
            specs[-1] += "," + part
        elif part:
            specs.append(part)
    return specs


def run_bench(engine, methods: list[str], prompts: list[BenchPrompt], max_new_tokens: int,
              sampling: SamplingConfig, repeats: int = 1, hf_baselines: bool = False,
              show_progress: bool = True, batch_size: int = 1) -> dict[str, MethodRun]:
    from tqdm.auto import tqdm

    if "plain" not in methods:
        methods = ["plain", *methods]  # speedups are ratios to plain decoding measured in this run
    extra = ["hf", "hf-pld"] if hf_baselines else []
    bar = tqdm(total=len(prompts) * (len(methods) + len(extra)), disable=not show_progress, unit="gen")
    runs: dict[str, MethodRun] = {}
    for m in methods:
        bar.set_description(m)
        runs[m] = run_method(engine, m, prompts, max_new_tokens, sampling, repeats, bar.update, batch_size)
    for kind in extra:
        bar.set_description(kind)
        runs[kind] = run_hf_baseline(engine, kind, prompts, max_new_tokens, repeats, bar.update)
    bar.close()
    return runs


def run_bench_cli(args: argparse.Namespace) -> None:
    import decodekit

    from .report import summarize, print_table, write_json, write_markdown, write_plot
    from ..cli import sampling_from

    sampling = sampling_from(args)
    methods = split_methods(args.methods)
    from ..speculative import DRAFTERS

    for m in methods:
        if m.partition(":")[0] not in DRAFTERS:
            raise ValueError(f"unknown method {m!r}; available: {', '.join(sorted(DRAFTERS))}")
    prompts = load_prompts(args.dataset, args.limit)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    # No prefix cache: every method pays for its own prefill (a method run after another would find the prompts'
    # KV cached and look faster than it is).
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, prefix_caching=False,
                            tensor_parallel=args.tensor_parallel, window_ring=not args.no_window_ring)
    runs = run_bench(engine, methods, prompts, args.max_new_tokens, sampling, args.repeats, args.hf_baselines,
                     batch_size=args.batch_size)
    summary = summarize(runs)
    meta = {"model": args.model, "device": str(engine.device), "dtype": str(engine.model.dtype).replace("torch.", ""),
            "dataset": args.dataset, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
            "repeats": args.repeats, "batch_size": args.batch_size, "sampling": sampling.__dict__,
            "torch": torch.__version__}
    print_table(summary, meta)
    if args.json_out:
        write_json(args.json_out, runs, summary, meta)
    if args.markdown:
        write_markdown(args.markdown, summary, meta)
    if args.plot:
        write_plot(args.plot, summary, meta)
