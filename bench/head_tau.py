"""Tau (tokens per verify step) of trained draft heads on Spec-Bench prompts, full drafts (`adaptive=False`).

    .venv/bin/python bench/head_tau.py --model smollm2 --methods eagle --limit 1 --max-new-tokens 64 \
        [--device cpu --dtype float32] [-O path=DIR] [-O branch=1]

Prints one JSON line per method: mean tau over prompts, acceptance by depth, tokens/s, and whether every output
equals plain greedy decoding's (it must: verification is lossless).
"""
from __future__ import annotations

import argparse
import json
import time

import torch

import decodekit
from decodekit.bench.datasets import load_prompts
from decodekit.cli import parse_options


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--methods", default="eagle")
    p.add_argument("--dataset", default="spec-bench")
    p.add_argument("--limit", type=int, default=1, help="prompts per category")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("-O", dest="options", action="append", default=[])
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, progress=False)
    prompts = load_prompts(args.dataset, args.limit)
    t = time.perf_counter()
    plain = [engine.generate(q.prompt, args.max_new_tokens, chat=True) for q in prompts]
    plain_s = time.perf_counter() - t
    options = parse_options(args.options)
    for method in args.methods.split(","):
        t = time.perf_counter()
        runs = [engine.generate(q.prompt, args.max_new_tokens, chat=True, method=method, adaptive=False, **options)
                for q in prompts]
        seconds = time.perf_counter() - t
        steps = sum(r.stats.decode_steps for r in runs)
        committed = sum(r.stats.tau * r.stats.decode_steps for r in runs)
        depth = max(len(r.stats.accepted_by_position) for r in runs)
        by_depth = [sum(r.stats.accepted_by_position[d] * r.stats.decode_steps for r in runs
                        if d < len(r.stats.accepted_by_position)) / steps for d in range(depth)]
        print(json.dumps({"method": method, "options": options, "prompts": len(prompts),
                          "tau": committed / steps, "accepted_by_depth": [round(a, 3) for a in by_depth],
                          "identical_to_plain": sum(r.token_ids == q.token_ids for r, q in zip(runs, plain)),
                          "tokens_per_s": sum(len(r.token_ids) for r in runs) / seconds,
                          "plain_tokens_per_s": sum(len(q.token_ids) for q in plain) / plain_s,
                          "device": str(engine.device), "dtype": str(engine.model.dtype).removeprefix("torch.")}))


if __name__ == "__main__":
    main()
