"""Where a long-context batch's decode spends its host time: cProfile (Python) around the decode phase of B random
prompts on a random-weight Gemma 3 270M, per config, beside a timed run's tokens/s and tau.

    PYTHONPATH=$PWD python3 bench/host_profile_long.py --length 8192 --batch 32 --new-tokens 128 \
        --configs method:magicdec,method:triforce

Configs in `long_context_bench.py`'s syntax. Meant for a GPU: the host time that matters is what the host spends
beside the CUDA-graph replays (`profile_long.py` has the device's side).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import decodekit  # noqa: E402
from decodekit.bench.together import decode_together  # noqa: E402
from decodekit.sampling import SamplingConfig  # noqa: E402
from long_context_bench import config_kwargs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=8192)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--configs", default="plain,method:magicdec")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--top", type=int, default=35, help="functions listed, by their own time")
    args = ap.parse_args()
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    engine = decodekit.load(f"random:{args.shape}", device=args.device, dtype=dtype, progress=False,
                            prefix_caching=False, kv_tokens=args.batch * (args.length + args.new_tokens + 512))
    rng = random.Random(0)
    vocab = engine.model.config.vocab_size
    length = min(args.length, engine.max_context - args.new_tokens - 8)
    prompts = [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(args.batch)]
    greedy = SamplingConfig(temperature=0.0)
    for config in args.configs.split(","):
        kw = config_kwargs(config)
        decode_together(engine, prompts, args.new_tokens, sampling=greedy, ignore_eos=True, **kw)  # warm-up
        got = decode_together(engine, prompts, args.new_tokens, sampling=greedy, ignore_eos=True, **kw)
        tau = sum(r.stats.tau for r in got.results) / len(got.results)
        print(f"{config}: timed {got.decode_tok_s:.1f} tok/s, tau {tau:.2f}", flush=True)
        prof = cProfile.Profile()
        got = decode_together(engine, prompts, args.new_tokens, lambda: prof, sampling=greedy, ignore_eos=True, **kw)
        print(f"{config}: profiled {got.decode_tok_s:.1f} tok/s, decode {got.decode_s:.3f} s", flush=True)
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(args.top)
        print(text.getvalue(), flush=True)


if __name__ == "__main__":
    main()
