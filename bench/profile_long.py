"""Where a long prompt's time goes on the GPU: the prefill of one prompt, and a batch's decode steps at that
context, with and without a KV press (torch.profiler's top kernels against the wall time).

    PYTHONPATH=$PWD python3 bench/profile_long.py --shape gemma3-270m --length 32768 --batch 8 --out $OUT

Random weights of the shape (speed does not depend on them); prompts are random token ids; decoding ignores EOS.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import decodekit  # noqa: E402
from decodekit.bench.together import decode_together  # noqa: E402
from decodekit.sampling import SamplingConfig  # noqa: E402
from long_context_bench import config_kwargs  # noqa: E402  (plain, press:NAME:RATIO[:k=v;...], method:NAME[...])


def top_kernels(prof, n: int = 12) -> list[dict]:
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    return [{"name": e.key[:90], "calls": e.count, "ms": round(e.device_time_total / 1e3, 3),
             "us_each": round(e.device_time_total / e.count, 2)} for e in events[:n]]


def host_ops(prof, n: int = 8) -> list[dict]:
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    return [{"name": e.key[:90], "calls": e.count, "self_ms": round(e.self_cpu_time_total / 1e3, 3)}
            for e in events[:n]]


def device_ms(prof) -> float:
    return sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 1e3


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--configs", default="plain,press:snapkv:0.75")
    ap.add_argument("--kv-tokens", type=int, default=None)
    ap.add_argument("--max-step-tokens", type=int, default=2048, help="the prefill chunk budget of a pass")
    ap.add_argument("--out", default=".")
    ap.add_argument("--decode-only", action="store_true", help="skip the one-prompt prefill profile")
    ap.add_argument("--no-timed", action="store_true",
                    help="per config only the warm-up and the profiled run (a batch of 64 at 32k prefills 35 s a run)")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    kw = {"kv_tokens": args.kv_tokens} if args.kv_tokens else {}
    kw["max_step_tokens"] = args.max_step_tokens
    engine = decodekit.load(f"random:{args.shape}", device="cuda" if cuda else "cpu",
                            dtype="bfloat16" if cuda else "float32", progress=False, prefix_caching=False, **kw)
    rng = random.Random(0)
    vocab = engine.model.config.vocab_size
    length = min(args.length, engine.max_context - args.new_tokens - 8)
    prompts = [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(args.batch)]
    greedy = SamplingConfig(temperature=0.0)
    report = {"shape": args.shape, "length": length, "batch": args.batch, "device": str(engine.device),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv)}

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if not args.decode_only:  # prefill of one prompt (a warm-up first: graphs, compilation, kernels' autotuning)
        engine.generate(prompts[0][:4096], 2, sampling=greedy, ignore_eos=True)
        sync()
        t0 = time.perf_counter()
        engine.generate(prompts[0], 1, sampling=greedy, ignore_eos=True)
        sync()
        report["prefill_wall_s"] = time.perf_counter() - t0
        with profile(activities=acts) as prof:
            t0 = time.perf_counter()
            engine.generate(prompts[0], 1, sampling=greedy, ignore_eos=True)
            sync()
            wall = time.perf_counter() - t0
        report["prefill_profiled"] = {"wall_s": wall, "device_ms": device_ms(prof), "top": top_kernels(prof),
                                      "host": host_ops(prof)}
        print(json.dumps({k: report[k] for k in ("prefill_wall_s", "prefill_profiled")}, indent=1), flush=True)

    report["decode"] = []
    for config in args.configs.split(","):
        options = config_kwargs(config)

        def run(profiled: bool) -> dict:
            prof = profile(activities=acts) if profiled else contextlib.nullcontext()
            got = decode_together(engine, prompts, args.new_tokens, lambda: prof, sampling=greedy, ignore_eos=True,
                                  **options)
            row = {"prefill_s": got.prefill_s, "decode_s": got.decode_s, "decode_tok_s": got.decode_tok_s,
                   "kv_bytes_final": sum(r.stats.kv_bytes_final for r in got.results),
                   "tau": sum(r.stats.tau for r in got.results) / len(got.results)}
            if profiled:
                row.update(device_ms=device_ms(prof), top=top_kernels(prof), host=host_ops(prof))
            return row

        run(False)  # warm-up: graph capture for this batch and press
        row = {"config": config, "timed": None if args.no_timed else run(False), "profiled": run(True)}
        print(json.dumps(row, indent=1), flush=True)
        report["decode"].append(row)
        save(report, args, length)  # after every config: a call that runs out of time keeps what it measured


def save(report: dict, args, length: int) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"profile_long_{args.shape}_{length}_b{args.batch}_c{args.max_step_tokens}.json"
    (out / name).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
