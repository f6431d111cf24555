"""Token frequency ranking for `-O draft_vocab=N` (FR-Spec, Zhao et al. 2025), written beside trained heads.

    .venv/bin/python bench/token_ranks.py --model smollm2 --num-prompts 4000 \
        --out decodekit/speculative/trained/smollm2-eagle [--out ...]

Counts the target tokenizer's ids over ShareGPT first user turns (seeded shuffle; prompts equal to a benchmark
prompt dropped, as for the heads' training data), the tokenizer's special and EOS ids first; writes
`token_ranks.safetensors` into each `--out` folder and prints how much of the counted text the top N cover.
"""
from __future__ import annotations

import argparse
import json
import random
import time

import torch

import decodekit
from decodekit.speculative.token_ranks import save_token_ranks, special_ids, token_counts, token_ranks
from decodekit.train.data import measured_texts, read_prompts

SHAREGPT = "../shared/data/sharegpt_prompts/sharegpt_v3_partial_human_turns.jsonl.gz"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2")
    p.add_argument("--prompts", default=SHAREGPT)
    p.add_argument("--num-prompts", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", action="append", required=True, help="head folder(s) to write the ranking into")
    args = p.parse_args()
    t = time.perf_counter()
    engine = decodekit.load(args.model, device="cpu", progress=False)  # its tokenizer and EOS ids
    tokenizer, config = engine.tokenizer, engine.model.config
    banned = measured_texts()
    prompts = [q for q in read_prompts(args.prompts) if " ".join(q.split()).lower() not in banned]
    random.Random(args.seed).shuffle(prompts)
    prompts = prompts[:args.num_prompts]
    keep = special_ids(tokenizer, sorted(engine.eos_ids))
    counts = token_counts(tokenizer, prompts, config.vocab_size)
    ranks = token_ranks(counts, keep)
    covered = counts[ranks].cumsum(0) / counts.sum()
    for folder in args.out:
        save_token_ranks(ranks, folder)
    print(json.dumps({"model": args.model, "prompts": len(prompts), "tokens": int(counts.sum()),
                      "special_ids_first": keep, "seconds": round(time.perf_counter() - t, 1),
                      "coverage": {n: round(float(covered[n - 1]), 4) for n in (1024, 4096, 8192, 16384, 32768)
                                   if n <= config.vocab_size}}))


if __name__ == "__main__":
    main()
