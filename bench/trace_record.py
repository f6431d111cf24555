"""Record step traces (every decode step's verify width, tree, accepted count and draft passes) of real-model
generations, for `bench/trace_replay.py`. Greedy decoding, one prompt at a time, no prefix cache.

    python3 bench/trace_record.py --model smollm2 --methods pld,eagle,layerskip,draft:model=smollm2 \
        --limit 2 --max-new-tokens 256 --out traces.jsonl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402
from decodekit.bench.datasets import load_prompts  # noqa: E402
from decodekit.bench.runner import split_methods  # noqa: E402
from decodekit.bench.trace import parse_method, record, write_traces  # noqa: E402
from decodekit.sampling import SamplingConfig  # noqa: E402
from decodekit.speculative import DRAFTERS  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--methods", default="pld",
                    help="bench specs (name or name:k=v), comma-separated; separate with ';' when a spec has several "
                         "options (name:k=v,k=v)")
    ap.add_argument("--dataset", default="spec-bench", help="spec-bench or a .jsonl file")
    ap.add_argument("--limit", type=int, default=1, help="prompts per category")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--out", required=True, metavar="OUT.jsonl")
    ap.add_argument("--adaptive", action="store_true",
                    help="keep the draft budget on (default off: it weighs the recording model's step costs)")
    args = ap.parse_args(argv)
    methods = split_methods(args.methods)
    for m in methods:
        if parse_method(m)[0] not in DRAFTERS:
            sys.exit(f"error: unknown method {m!r}; available: {', '.join(sorted(DRAFTERS))}")
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, prefix_caching=False, progress=False)
    prompts = load_prompts(args.dataset, args.limit)
    lines = record(engine, args.model, methods, prompts, args.max_new_tokens, SamplingConfig(),
                   adaptive=None if args.adaptive else False)
    write_traces(args.out, lines)
    print(f"{len(lines)} traces ({len(methods)} methods x {len(prompts)} prompts) -> {args.out}")


if __name__ == "__main__":
    main()
