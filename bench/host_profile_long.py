"""Where a long-context batch's decode spends its host time: cProfile (Python) around the decode phase of B random
prompts on a random-weight Gemma 3 270M, per config, beside a timed run's tokens/s and tau.

    PYTHONPATH=$PWD python3 bench/host_profile_long.py --length 8192 --batch 32 --new-tokens 128 \
        --configs method:magicdec,method:triforce
    # the real model (drafts accepted as on real text): --model gemma3-270m --data-dir PATH

Configs in `long_context_bench.py`'s syntax. Meant for a GPU: the host time that matters is what the host spends
beside the CUDA-graph replays. `--device-profile` profiles the device's side of the same decode instead
(torch.profiler: the kernels' total time against the wall time, the top kernels, and the gaps where the device
waited, with the host ops that ran meanwhile), on the real model too.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sys
import time
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import decodekit  # noqa: E402
from decodekit.bench.together import decode_together  # noqa: E402
from decodekit.eval.long_context import Haystack, data_dir, make_sample, vocabulary  # noqa: E402
from decodekit.sampling import SamplingConfig  # noqa: E402
from long_context_bench import config_kwargs  # noqa: E402
from profile_long import device_ms, top_kernels  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--configs", default="plain,method:magicdec")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=35, help="functions listed, by their own time")
    ap.add_argument("--model", default=None, help="a real model instead of random weights: needle-in-a-haystack "
                    "prompts (as long_context_bench.py builds them), so that drafts are accepted as on real text")
    ap.add_argument("--data-dir", default=None, help="the long-context data (with --model)")
    ap.add_argument("--device-profile", action="store_true",
                    help="torch.profiler's kernels instead of cProfile (and no timed run: warm-up, then profiled)")
    ap.add_argument("--out", default=None, help="with --device-profile: a folder for device_profile.json")
    args = ap.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    engine = decodekit.load(args.model or f"random:{args.shape}", device=args.device, dtype=dtype, progress=False,
                            prefix_caching=False, kv_tokens=args.batch * (args.length + args.new_tokens + 512))
    length = min(args.length, engine.max_context - args.new_tokens - 8)
    if args.model:
        haystack = Haystack.load(engine.tokenizer, data_dir(args.data_dir))
        depths = [i / max(1, args.batch - 1) for i in range(args.batch)]
        prompts = [make_sample("niah", haystack, engine.tokenizer, length, d, random.Random(i),
                               vocabulary(haystack)).prompt for i, d in enumerate(depths)]
    else:
        rng = random.Random(0)
        vocab = engine.model.config.vocab_size
        prompts = [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(args.batch)]
    greedy = SamplingConfig(temperature=0.0)
    report = {"model": args.model or f"random:{args.shape}", "length": length, "batch": args.batch,
              "new_tokens": args.new_tokens, "command": " ".join(sys.argv),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "configs": {}}
    for config in args.configs.split(","):
        kw = config_kwargs(config)
        decode_together(engine, prompts, args.new_tokens, sampling=greedy, ignore_eos=True, **kw)  # warm-up
        if args.device_profile:
            report["configs"][config] = device_profile(engine, prompts, args.new_tokens, greedy, kw, args.top)
            print(json.dumps({config: report["configs"][config]}, indent=1), flush=True)
            continue
        got = decode_together(engine, prompts, args.new_tokens, sampling=greedy, ignore_eos=True, **kw)
        tau = sum(r.stats.tau for r in got.results) / len(got.results)
        print(f"{config}: timed {got.decode_tok_s:.1f} tok/s, tau {tau:.2f}", flush=True)
        prof = cProfile.Profile()
        got = decode_together(engine, prompts, args.new_tokens, lambda: prof, sampling=greedy, ignore_eos=True, **kw)
        print(f"{config}: profiled {got.decode_tok_s:.1f} tok/s, decode {got.decode_s:.3f} s", flush=True)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
        print(text.getvalue(), flush=True)
    if args.device_profile and args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "device_profile.json").write_text(json.dumps(report, indent=1))


def idle_gaps(prof, least_us: float = 100.0, listed: int = 15) -> dict:
    """Where the device waited: gaps of at least `least_us` between one kernel's end and the next one's start, with
    when each began (ms from the first kernel) and the host ops that started during it (the most frequent)."""
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start)
    host = sorted((e.time_range.start, e.name) for e in events if e.device_type.name == "CPU")
    if not kernels:
        return {}
    gaps, reach = [], kernels[0][1]
    for start, end in kernels[1:]:
        if start - reach >= least_us:
            gaps.append((reach, start))
        reach = max(reach, end)
    t0 = kernels[0][0]

    def during(a: float, b: float) -> list:
        names: dict[str, int] = {}
        for t, name in host:
            if a <= t < b:
                names[name] = names.get(name, 0) + 1
        return sorted(names.items(), key=lambda kv: -kv[1])[:6]

    top = sorted(gaps, key=lambda g: g[0] - g[1])[:listed]
    return {"least_us": least_us, "count": len(gaps), "total_ms": round(sum(b - a for a, b in gaps) / 1e3, 2),
            "span_ms": round((reach - t0) / 1e3, 2),
            "largest": [{"at_ms": round((a - t0) / 1e3, 2), "ms": round((b - a) / 1e3, 3), "host_ops": during(a, b)}
                        for a, b in sorted(top)]}


def device_profile(engine, prompts: list, new_tokens: int, greedy: SamplingConfig, kw: dict, top: int) -> dict:
    """One profiled decode: the kernels' summed time against the decode's wall time (their ratio is how busy the
    device was, kernels of one stream not overlapping), graph replays, host syncs, and the `top` kernels."""
    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    got = decode_together(engine, prompts, new_tokens, lambda: prof, sampling=greedy, ignore_eos=True, **kw)
    busy_ms = device_ms(prof)
    count = {e.key: e.count for e in prof.key_averages() if e.key in ("cudaGraphLaunch", "cudaEventSynchronize",
                                                                      "cudaStreamSynchronize", "cudaMemcpyAsync")}
    return {"decode_s": round(got.decode_s, 4), "decode_tok_s": round(got.decode_tok_s, 1), "gaps": idle_gaps(prof),
            "tau": round(sum(r.stats.tau for r in got.results) / len(got.results), 3),
            "device_ms": round(busy_ms, 2), "device_busy": round(busy_ms / 1e3 / got.decode_s, 3),
            "host_calls": count, "kernels": top_kernels(prof, top)}


if __name__ == "__main__":
    main()
