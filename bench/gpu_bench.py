"""The whole GPU benchmark in one process: roofline, decodekit eager vs CUDA graphs, transformers baselines,
time to first token, and the speculative methods on the real model with Spec-Bench prompts.

    PYTHONPATH=/root/site:$PWD python3 bench/gpu_bench.py --out $OUT \
        [--smollm2 /root/models/smollm2.gguf] [--spec-bench .device/question.jsonl] [--quick]

Timings: CUDA synchronized around each generation, one warm-up generation excluded, median of `--repeats` runs.
Random-weight models measure speed only (their outputs mean nothing); speculative figures come from the real model.
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
from decodekit.engine import Engine  # noqa: E402


def log(*a) -> None:
    print(*a, flush=True)


def timed(fn, repeats: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written per second."""
    x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    seconds, _ = timed(lambda: y.copy_(x), 10)
    del x, y
    return 2 * (2 << 30) / seconds


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def decode_speed(engine: Engine, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    ids = torch.randint(3, 200, (prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    seconds, r = timed(lambda: engine.generate(ids, new_tokens, ignore_eos=True), repeats)
    decode_tps = statistics.median([engine.generate(ids, new_tokens, ignore_eos=True).stats.tokens_per_s
                                    for _ in range(repeats)])
    return {"end_to_end_tok_s": new_tokens / seconds, "decode_tok_s": decode_tps, "tokens": len(r.token_ids)}


def hf_speed(config, new_tokens: int, repeats: int, static: bool) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config.to_hf())
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    ids = torch.randint(3, 200, (1, 64), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    if static:
        kw["cache_implementation"] = "static"
    with torch.inference_mode():
        seconds, _ = timed(lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **kw), repeats)
    del model
    torch.cuda.empty_cache()
    return new_tokens / seconds


def ttft(engine: Engine, prompt_len: int, repeats: int) -> float:
    ids = torch.randint(3, 200, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    return statistics.median([engine.generate(ids, 1, ignore_eos=True).stats.time_to_first_token_s
                              for _ in range(repeats + 1)][1:])


def shapes_section(args, results: dict, bandwidth: float) -> None:
    from decodekit.models.config import shape

    for name in args.shapes:
        log(f"== random:{name}")
        graphed = decodekit.load(f"random:{name}", device="cuda", dtype="bfloat16")
        eager = Engine(graphed.model.model, graphed.tokenizer, name=f"random:{name} (eager)")
        nbytes = weight_bytes(graphed.model)
        row = {"weight_bytes": nbytes, "floor_tok_s": bandwidth / nbytes}
        row["graphed"] = decode_speed(graphed, 64, args.new_tokens, args.repeats)
        row["eager"] = decode_speed(eager, 64, args.new_tokens, args.repeats)
        for kind in ("graphed", "eager"):
            row[kind]["bandwidth_GBps"] = row[kind]["decode_tok_s"] * nbytes / 1e9
            row[kind]["of_floor"] = row[kind]["decode_tok_s"] / row["floor_tok_s"]
        if name == "llama3-8b":
            row["ttft_1k_s"] = ttft(graphed, 1024, args.repeats)
            row["ttft_8k_s"] = ttft(graphed, 8192, args.repeats)
        del graphed, eager
        torch.cuda.empty_cache()
        if not args.skip_hf:
            for static in (False, True):
                key = "hf_static_tok_s" if static else "hf_dynamic_tok_s"
                try:
                    row[key] = hf_speed(shape(name), args.new_tokens, max(1, args.repeats - 1), static)
                except Exception as e:  # noqa: BLE001 - report, do not hide, a baseline that failed
                    row[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        results["shapes"][name] = row
        log(json.dumps(row, indent=1, default=str))


def spec_section(args, results: dict) -> None:
    from decodekit.bench.datasets import load_prompts
    from decodekit.bench.report import markdown_table, summarize
    from decodekit.bench.runner import run_bench, run_hf_baseline
    from decodekit.sampling import SamplingConfig

    engine = decodekit.load(args.smollm2, device="cuda", dtype="bfloat16")
    prompts = load_prompts(args.spec_bench, args.per_category)
    log(f"== speculative methods on smollm2 (bf16, graphed), {len(prompts)} prompts x {args.new_tokens} tokens")
    runs = run_bench(engine, args.methods, prompts, args.new_tokens, SamplingConfig(), repeats=args.repeats,
                     show_progress=False)
    if not args.skip_hf:
        subset = prompts[:: max(1, len(prompts) // args.hf_prompts)][: args.hf_prompts]
        for kind in ("hf", "hf-pld"):
            runs[kind] = run_hf_baseline(engine, kind, subset, args.new_tokens, 1)
    summary = summarize(runs)
    results["spec_bench"] = {"summary": summary, "table": markdown_table(summary),
                             "accepted_by_position": {m: r.accepted_by_position for m, r in runs.items()}}
    log(results["spec_bench"]["table"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--smollm2", default=None, help="path of the real SmolLM2 GGUF (or folder)")
    parser.add_argument("--spec-bench", default="spec-bench")
    parser.add_argument("--shapes", nargs="*", default=["smollm2-135m", "gemma3-270m", "llama3-8b"])
    parser.add_argument("--methods", nargs="*",
                        default=["plain", "pld", "suffix", "recycling", "aded", "lookahead", "layerskip"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--hf-prompts", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "shapes": {}}
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    log(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    out = Path(args.out)
    try:
        if args.shapes:
            shapes_section(args, results, bandwidth)
        if args.smollm2:
            spec_section(args, results)
    finally:
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))
    log("\n| shape | weights | floor tok/s | eager tok/s | graphed tok/s | graphed % of floor | HF dynamic | HF static |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results["shapes"].items():
        hf_d, hf_s = r.get("hf_dynamic_tok_s", "-"), r.get("hf_static_tok_s", "-")
        fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
        log(f"| {name} | {r['weight_bytes'] / 1e9:.2f} GB | {r['floor_tok_s']:.0f} | {r['eager']['decode_tok_s']:.1f} |"
            f" {r['graphed']['decode_tok_s']:.1f} | {100 * r['graphed']['of_floor']:.0f}% | {fmt(hf_d)} | {fmt(hf_s)} |")
        if "ttft_1k_s" in r:
            log(f"  ttft 1k: {1e3 * r['ttft_1k_s']:.1f} ms, 8k: {1e3 * r['ttft_8k_s']:.1f} ms")


if __name__ == "__main__":
    main()
