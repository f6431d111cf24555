"""Where a trained head's decode steps spend their time: per verified step, the target's verify pass (layout, replay,
the copy of its rows), the head's draft (its pass, replayed under CUDA graphs, and the tree's one host copy; plus
the host work of proposing around it) and the rest of the step on the host (verification walk, commits, the draft
budget, the features kept), each bounded by device synchronizations; beside plain decoding on the same prompts.

    python bench/head_step_times.py --model smollm2 --method eagle --device cuda --dtype bfloat16 \
        --spec-bench spec-bench --prompts 6 --new-tokens 256 [-O depth=6 -O branch=8 -O max_nodes=60] [--adaptive]

The synchronizations cost a little of the overlap a real run has (each step already waits for the draft's tree and
the verify's argmax). The first prompt runs once untimed (captures, compilation).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from unittest.mock import patch

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402
from decodekit.bench.datasets import load_prompts  # noqa: E402
from decodekit.cli import parse_options  # noqa: E402
from decodekit.speculative import DRAFTERS  # noqa: E402


def sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)


@dataclass
class Split:
    """Seconds of the decode steps, summed: the whole step and its parts."""

    steps: int = 0
    tokens: int = 0
    total: float = 0.0
    verify: float = 0.0  # the runner's pass(es)
    draft: float = 0.0  # the drafter's propose
    head: float = 0.0  # inside it: the head's draft pass and the host copy of its tree
    per_step: list[tuple[float, float, float, float]] = field(default_factory=list)

    @property
    def host(self) -> float:
        return self.total - self.verify - self.draft

    def line(self) -> str:
        ms = lambda x: f"{x / max(self.steps, 1) * 1e3:.2f}"  # noqa: E731
        tau, rate = self.tokens / max(self.steps, 1), self.tokens / self.total
        return (f"{self.steps} steps, tau {tau:.2f}, {rate:.0f} tok/s; "
                f"per step (ms): total {ms(self.total)} = verify {ms(self.verify)} + draft {ms(self.draft)} "
                f"(head pass + tree copy {ms(self.head)}) + host {ms(self.host)}")


class Clock:
    """Adds up the time of the runner's passes and of a drafter class's `propose` / `_draft` while it is installed."""

    def __init__(self, engine, drafter_cls) -> None:
        self.engine, self.cls = engine, drafter_cls
        self.parts = {"verify": 0.0, "draft": 0.0, "head": 0.0}

    def timed(self, fn, part: str):
        def run(*args, **kwargs):
            sync(self.engine)
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.engine)
                self.parts[part] += time.perf_counter() - t
        return run

    @contextmanager
    def installed(self):
        runner, cls = self.engine.core.runner, self.cls
        with ExitStack() as stack:
            stack.enter_context(patch.object(runner, "run", self.timed(runner.run, "verify")))
            stack.enter_context(patch.object(cls, "propose", self.timed(cls.propose, "draft")))
            if hasattr(cls, "_draft"):
                stack.enter_context(patch.object(cls, "_draft", self.timed(cls._draft, "head")))
            yield self


def measure(engine, prompt: str | list[int], new_tokens: int, method: str, options: dict, adaptive: bool,
            chat: bool, split: Split) -> None:
    """One generation of `prompt` by `method`, step by step; its decode steps are added to `split`."""
    req = engine.add_request(prompt, new_tokens, method=method, chat=chat, adaptive=adaptive, method_options=options)
    seq = req.sequences[0]
    clock = Clock(engine, type(seq.drafter))
    with clock.installed():
        while engine.core.has_work():
            decoding = bool(seq.output)  # the first step prefills the prompt and draws the first token
            before = len(seq.output)
            for part in clock.parts:
                clock.parts[part] = 0.0
            sync(engine)
            t = time.perf_counter()
            engine.step()
            sync(engine)
            total = time.perf_counter() - t
            if decoding:
                p = clock.parts
                split.steps += 1
                split.tokens += len(seq.output) - before
                split.total += total
                split.verify += p["verify"]
                split.draft += p["draft"]
                split.head += p["head"]
                split.per_step.append((total, p["verify"], p["draft"], p["head"]))


def plain_rate(engine, prompts, new_tokens: int, chat: bool) -> float:
    tokens = seconds = 0.0
    for prompt in prompts:
        r = engine.generate(prompt, new_tokens, chat=chat)
        tokens += len(r.token_ids) - 1
        seconds += (len(r.token_ids) - 1) / r.stats.tokens_per_s if r.stats.tokens_per_s else 0.0
    return tokens / seconds if seconds else 0.0


def run(args: argparse.Namespace) -> dict:
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, prefix_caching=False)
    if args.method not in DRAFTERS:
        raise ValueError(f"unknown method {args.method!r}")
    options = parse_options(args.method_option)
    picked = load_prompts(args.spec_bench, None)
    if args.category:
        picked = [p for p in picked if p.category == args.category]
    prompts = [p.prompt for p in picked[:args.prompts]]
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    measure(engine, prompts[0], args.new_tokens, args.method, options, args.adaptive, chat, Split())  # warm-up
    plain_rate(engine, prompts[:1], args.new_tokens, chat)
    split = Split()
    for prompt in prompts:
        measure(engine, prompt, args.new_tokens, args.method, options, args.adaptive, chat, split)
    plain = plain_rate(engine, prompts, args.new_tokens, chat)
    print(f"{args.model} {args.method} {options or ''} on {engine.device} ({args.dtype}), {len(prompts)} prompts, "
          f"{args.new_tokens} new tokens, adaptive={args.adaptive}")
    print(f"  {args.method}: {split.line()}")
    rate = split.tokens / split.total if split.total else 0.0
    print(f"  plain: {plain:.0f} tok/s (the head's steps with synchronizations: {rate / plain if plain else 0:.2f}x)")
    slow = sorted(range(len(split.per_step)), key=lambda i: -split.per_step[i][0])[:5]
    print("  slowest steps (ms: total, verify, draft, head):",
          [tuple(round(x * 1e3, 2) for x in split.per_step[i]) for i in slow])
    # Means include the steps that capture a graph (seconds each, once per shape); the median step is a warm one.
    median = [round(statistics.median(col) * 1e3, 2) for col in zip(*split.per_step)] if split.per_step else []
    print("  median step (ms: total, verify, draft, head):", tuple(median))
    return {"split": split, "plain_tok_s": plain, "median_step_ms": median}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", default="eagle")
    ap.add_argument("--method-option", "-O", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--spec-bench", default="spec-bench")
    ap.add_argument("--category", default=None)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--adaptive", action="store_true", help="let the draft budget decide (default: every draft)")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    main()
