"""Where a batched decode step's time goes on the GPU: graph replay alone vs the engine's whole step, by batch size,
and the top kernels of one fused chunk (torch.profiler).

    PYTHONPATH=$PWD python3 bench/profile_batch.py --shape smollm2-135m --batches 1,8,32,128 --out $OUT
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402
from decodekit.models.batch import RowSpec  # noqa: E402


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--prompt", type=int, default=300)
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    engine = decodekit.load(f"random:{args.shape}", device=args.device, dtype="bfloat16" if cuda else "float32",
                            compile=bool(args.compile) and cuda, cuda_graphs=True if cuda else None)
    if not cuda:  # the static-buffer path on the CPU, to check this script
        from decodekit.engine import Engine

        engine = Engine(engine.model, engine.tokenizer, cuda_graphs=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    runner = engine.core.runner
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [[3 + (i * 7 + j) % 250 for j in range(args.prompt)] for i in range(b)]
        engine.generate(prompts, 80, ignore_eos=True)  # warm-up: captures
        sync()
        t = time.perf_counter()
        results = engine.generate(prompts, 80, ignore_eos=True)
        sync()
        wall = time.perf_counter() - t
        # the fused chunk alone: replay the 16-step pass over these sequences' KV memory, no host work between
        reqs = [engine.add_request(p, 200, ignore_eos=True) for p in prompts]
        while any(r.sequences[0].prefilling or not r.sequences[0].output for r in reqs):
            engine.step()
        seqs = [r.sequences[0] for r in reqs]
        for s in seqs:
            s.kv.ensure(s.kv.length + 16 * 4)
        kvs = [s.kv for s in seqs]
        lengths = [kv.length for kv in kvs]
        list(runner.greedy_chunks(kvs, [s.tokens[-1] for s in seqs], [len(s.tokens) - 1 for s in seqs], 16, 2))
        for kv, n in zip(kvs, lengths):
            kv.length = n
        sync()
        t = time.perf_counter()
        list(runner.greedy_chunks(kvs, [s.tokens[-1] for s in seqs], [len(s.tokens) - 1 for s in seqs], 16, 2))
        sync()
        chunk = (time.perf_counter() - t) / 32
        for kv, n in zip(kvs, lengths):
            kv.length = n
        if b == 32 and cuda:
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                list(runner.greedy_chunks(kvs, [s.tokens[-1] for s in seqs], [len(s.tokens) - 1 for s in seqs],
                                          16, 1))
                sync()
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
            Path(args.out, "profile_b32.txt").write_text(table)
            print(table[:6000])
        for r in reqs:
            engine.core.abort(r)
        row = {"batch": b, "engine_ms_per_step": 1e3 * wall / 80, "engine_tok_s": b * 80 / wall,
               "chunk_replay_ms_per_step": 1e3 * chunk, "replay_tok_s": b / chunk,
               "passes": len(runner.passes)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out, "profile_batch.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
