"""Where one generation's time goes, step by step: each `engine.step()` timed with the device synchronized, for
several methods on one prompt, alternating, so that a method's slow steps (prefill, captures, host round trips)
show against the others'. Prints one line per generation: total seconds, steps, the slowest steps.

    PYTHONPATH=/root/site:$PWD python3 bench/step_times.py --model /root/models/smollm2.gguf \
        --spec-bench .device/question.jsonl --category summarization --methods plain,pld --rounds 3
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402
from decodekit.bench.datasets import load_prompts  # noqa: E402


def sync(engine) -> None:
    if engine.device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--spec-bench", default="spec-bench")
    ap.add_argument("--category", default="summarization")
    ap.add_argument("--methods", default="plain,pld")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    args = ap.parse_args()
    engine = decodekit.load(args.model, prefix_caching=False)
    prompt = next(p.prompt for p in load_prompts(args.spec_bench, None) if p.category == args.category)
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    print(f"{args.category}: {len(engine.encode(prompt, chat=chat))} prompt tokens, chat={chat}")
    for r in range(args.rounds):
        for method in args.methods.split(","):
            engine.add_request(prompt, args.new_tokens, method=method, chat=chat)
            times, t_all = [], time.perf_counter()
            while engine.core.has_work():
                sync(engine)
                t = time.perf_counter()
                engine.step()
                sync(engine)
                times.append(time.perf_counter() - t)
            total = time.perf_counter() - t_all
            slow = sorted(((round(t * 1e3, 1), i) for i, t in enumerate(times)), reverse=True)[:6]
            print(f"round {r} {method:8s} {total:.3f} s, {len(times)} steps, first {times[0] * 1e3:.1f} ms, "
                  f"slowest (ms, step) {slow}", flush=True)


if __name__ == "__main__":
    main()
