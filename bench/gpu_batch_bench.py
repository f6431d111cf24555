"""Batched decoding throughput on one GPU: decodekit at several batch sizes (plain and drafters), transformers'
batched `generate` on the same weights, in one process. Prints a table last and writes JSON under --out.

    PYTHONPATH=/root/site:$PWD python3 bench/gpu_batch_bench.py --model /root/models/smollm2.gguf \
        --spec-bench .device/question.jsonl --batches 1,8,32,128 --methods plain,pld --out $OUT

Every sequence generates exactly --new-tokens tokens (`ignore_eos`, as llama.cpp's batched bench does). Per batch
size and method: one warm-up generation (graph capture, compilation) then the median of --repeats timed ones, the
device synchronized around each. `total` = all generated tokens / wall time (prefill included); `decode` = tokens
after each sequence's first / time after the last first token; `per_seq` = one sequence's tokens / wall time.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402


def log(*a) -> None:
    print(*a, flush=True)


def prompts_of(engine, path: str | None, n: int, length: int = 0) -> list:
    """Spec-Bench's first turns (chat template for chat models), cycled; or `length` random tokens each."""
    from decodekit.bench.datasets import load_prompts

    if length:
        g = torch.Generator().manual_seed(0)
        return torch.randint(100, 1000, (n, length), generator=g).tolist()
    chat = bool(getattr(engine.tokenizer, "chat_template", None))
    items = load_prompts(path or "spec-bench", None)
    texts = [p.prompt for p in items]
    out = [engine.encode(texts[i % len(texts)], chat=chat) for i in range(n)]
    return out


def run_batch(engine, prompts: list, new_tokens: int, method: str, repeats: int) -> dict:
    def once():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        results = engine.generate(prompts, new_tokens, method=method, ignore_eos=True)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        first = max(r.stats.time_to_first_token_s for r in results)
        tokens = sum(len(r.token_ids) for r in results)
        decode = sum(len(r.token_ids) - 1 for r in results) / max(wall - first, 1e-9)
        tau = statistics.mean(r.stats.tau for r in results)
        return {"wall_s": wall, "total_tok_s": tokens / wall, "decode_tok_s": decode,
                "per_seq_tok_s": new_tokens / wall, "tau": tau}

    once()  # warm-up: captures and compilation for this batch size
    runs = [once() for _ in range(repeats)]
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def hf_batch(folder, prompts: list, new_tokens: int, repeats: int) -> dict:
    """transformers' batched greedy `generate` (left padding, static cache) on the same weights."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16).cuda().eval()
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
              cache_implementation="static")

    def once():
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, **kw)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()
    wall = statistics.median(once() for _ in range(repeats))
    del model
    torch.cuda.empty_cache()
    return {"wall_s": wall, "total_tok_s": len(prompts) * new_tokens / wall, "per_seq_tok_s": new_tokens / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--spec-bench", default=None)
    ap.add_argument("--batches", default="1,8,32,128")
    ap.add_argument("--methods", default="plain,pld")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hf", default="", help="batch sizes for transformers' batched generate, e.g. 1,8,32")
    ap.add_argument("--compile", type=int, default=1)
    ap.add_argument("--prompt-tokens", type=int, default=0, help="random prompts of this many tokens instead")
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    out = {"args": vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": []}
    t = time.perf_counter()
    # No prefix cache: every timed run pays for its prefill (the same prompts are decoded again and again here).
    engine = decodekit.load(args.model, device="cuda", dtype="bfloat16", compile=bool(args.compile), progress=False,
                            prefix_caching=False)
    log(f"loaded {args.model} in {time.perf_counter() - t:.1f} s")
    batches = [int(b) for b in args.batches.split(",")]
    prompts = prompts_of(engine, args.spec_bench, max(batches), args.prompt_tokens)
    out["prompt_tokens_mean"] = sum(len(p) for p in prompts) / len(prompts)
    for b in batches:
        for method in args.methods.split(","):
            t = time.perf_counter()
            row = {"batch": b, "method": method, **run_batch(engine, prompts[:b], args.new_tokens, method,
                                                              args.repeats)}
            row["section_s"] = time.perf_counter() - t
            out["rows"].append(row)
            log(json.dumps(row))
            Path(args.out, "batch_bench.json").write_text(json.dumps(out, indent=1))
    out["graphs"] = sorted(engine.core.runner.passes) if hasattr(engine.core.runner, "passes") else []
    for b in [int(x) for x in args.hf.split(",") if x]:
        t = time.perf_counter()
        try:
            row = {"batch": b, "method": "transformers", **hf_batch(engine.source_folder, prompts[:b],
                                                                     args.new_tokens, args.repeats)}
        except Exception as e:  # noqa: BLE001 - a baseline that failed is reported, not hidden
            row = {"batch": b, "method": "transformers", "error": repr(e)[:300]}
        row["section_s"] = time.perf_counter() - t
        out["rows"].append(row)
        log(json.dumps(row))
        Path(args.out, "batch_bench.json").write_text(json.dumps(out, indent=1))
    log("\n| batch | method | total tok/s | decode tok/s | per-seq tok/s | tau |")
    log("|---:|---|---:|---:|---:|---:|")
    for r in out["rows"]:
        if "error" in r:
            log(f"| {r['batch']} | {r['method']} | error | | | |")
            continue
        log(f"| {r['batch']} | {r['method']} | {r['total_tok_s']:,.0f} | {r.get('decode_tok_s', 0):,.0f} | "
            f"{r['per_seq_tok_s']:,.1f} | {r.get('tau', 0):.2f} |")


if __name__ == "__main__":
    main()
