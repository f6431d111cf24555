"""What the layout of KIVI's packs costs a decode step: decode tokens/s at a context with `press="kivi"` as packed
now (a ring chunk packs all the ring's layers at once and is unpacked once a pass; the full layers' chunks merge as
they accumulate, `QuantState._coalesce`), against a pack per layer and chunk (both switched off) and plain
decoding, in one run (each config once untimed first). Random weights of the shape (speed does not depend on
them), random prompt tokens, greedy, EOS ignored; the prompts are prefilled first and only the decode that follows
is timed (`decode_together`).

    PYTHONPATH=$PWD python3 bench/kivi_chunks.py --shape gemma3-270m --length 16384 --batch 1 --new-tokens 32
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402
from decodekit.bench.together import decode_together  # noqa: E402
from decodekit.kv import KIVIPress  # noqa: E402
from decodekit.kv.paged.quantized import QuantState  # noqa: E402

CONFIGS = (("plain", {}, True), ("kivi", {"press": "kivi"}, True),
           ("kivi, a pack per layer and chunk", {"press": "kivi"}, False))


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per config (after one warm-up); median")
    ap.add_argument("--out", default=None, help="folder for the JSON record")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    engine = decodekit.load(f"random:{args.shape}", device="cuda" if cuda else "cpu",
                            dtype="bfloat16" if cuda else "float32", progress=False, prefix_caching=False)
    rng = random.Random(0)
    vocab = engine.model.config.vocab_size
    prompts = [[rng.randrange(3, vocab) for _ in range(args.length)] for _ in range(args.batch)]
    engine.generate(prompts[0][:2048], 8, ignore_eos=True)  # warm-up: graphs, kernels
    rows = []
    for name, options, merge in CONFIGS:
        with contextlib.ExitStack() as stack:
            if not merge:
                stack.enter_context(mock.patch.object(QuantState, "_coalesce", lambda self: None))
                stack.enter_context(mock.patch.object(KIVIPress, "heads_apart", False))
            runs = [decode_together(engine, prompts, args.new_tokens, ignore_eos=True, **options)
                    for _ in range(args.repeats + 1)][1:]  # the first: a warm-up
        rows.append({"config": name, "decode_tok_s": statistics.median(r.decode_tok_s for r in runs),
                     "kv_bytes_final": sum(x.stats.kv_bytes_final for x in runs[-1].results),
                     "tokens": [x.token_ids for x in runs[-1].results]})
    plain = rows[0]["decode_tok_s"]
    print(f"{args.shape}, {args.length} tokens, batch {args.batch}, {args.new_tokens} new, {engine.device}")
    print("| config | decode tok/s | vs plain | KV bytes held |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['config']} | {r['decode_tok_s']:,.1f} | {r['decode_tok_s'] / plain:.3f}x | "
              f"{r['kv_bytes_final']:,} |")
    print("kivi outputs identical in both layouts:", rows[1]["tokens"] == rows[2]["tokens"])
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  "device": str(engine.device), "rows": rows}
        (out / f"kivi_chunks_{args.shape}_{args.length}_b{args.batch}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
