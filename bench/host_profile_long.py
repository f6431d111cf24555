"""Where a long-context batch's decode spends its host time: cProfile (Python) around the decode phase of B random
prompts on a random-weight Gemma 3 270M, per config, beside a timed run's tokens/s and tau.

    PYTHONPATH=$PWD python3 bench/host_profile_long.py --length 8192 --batch 32 --new-tokens 128 \
        --configs method:magicdec,method:triforce
    # the real model (drafts accepted as on real text): --model gemma3-270m --data-dir PATH

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
from decodekit.eval.long_context import Haystack, data_dir, make_sample, vocabulary  # noqa: E402
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
    ap.add_argument("--model", default=None, help="a real model instead of random weights: needle-in-a-haystack "
                    "prompts (as long_context_bench.py builds them), so that drafts are accepted as on real text")
    ap.add_argument("--data-dir", default=None, help="the long-context data (with --model)")
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
