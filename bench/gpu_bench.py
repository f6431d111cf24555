"""The whole GPU benchmark in one process: roofline, decodekit eager vs CUDA graphs, transformers baselines,
time to first token, and the speculative methods on the real model with Spec-Bench prompts.

    PYTHONPATH=/root/site:$PWD python3 bench/gpu_bench.py --out $OUT \
        [--smollm2 /root/models/smollm2.gguf] [--gemma /root/models/gemma3-270m.gguf] [--spec-bench PATH]

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


def save(results: dict) -> None:
    """Write what is measured so far: a run cut short by a time limit still leaves its results."""
    Path(results["out"], "gpu_bench.json").write_text(json.dumps(results, indent=1, default=str))


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
    engine.generate(ids, new_tokens, ignore_eos=True)  # warm-up: capture, compilation
    runs = [engine.generate(ids, new_tokens, ignore_eos=True) for _ in range(repeats)]
    return {"decode_tok_s": statistics.median(r.stats.tokens_per_s for r in runs),
            "end_to_end_tok_s": statistics.median(new_tokens / r.stats.total_time_s for r in runs)}


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
        started = time.perf_counter()
        engine = decodekit.load(f"random:{name}", device="cuda", dtype="bfloat16", compile=False)
        eager = Engine(engine.model.model, engine.tokenizer, name=f"random:{name} (eager)")
        nbytes = weight_bytes(engine.model)
        row = {"weight_bytes": nbytes, "floor_tok_s": bandwidth / nbytes}
        row["eager"] = decode_speed(eager, 64, args.eager_tokens, args.repeats)
        row["graphed"] = decode_speed(engine, 64, args.new_tokens, args.repeats)
        engine.model.compile_blocks()  # the library's default on a GPU: graphs over compiled blocks
        t = time.perf_counter()
        row["compiled"] = decode_speed(engine, 64, args.new_tokens, args.repeats)
        row["compile_and_measure_s"] = time.perf_counter() - t
        for kind in ("eager", "graphed", "compiled"):
            row[kind]["bandwidth_GBps"] = row[kind]["decode_tok_s"] * nbytes / 1e9
            row[kind]["of_floor"] = row[kind]["decode_tok_s"] / row["floor_tok_s"]
        if name == "llama3-8b":
            row["ttft_1k_s"] = ttft(engine, 1024, args.repeats)
            row["ttft_8k_s"] = ttft(engine, 8192, args.repeats)
        del engine, eager
        torch.cuda.empty_cache()
        if not args.skip_hf and name in args.hf_shapes:
            for static in (False, True):
                key = "hf_static_tok_s" if static else "hf_dynamic_tok_s"
                try:
                    row[key] = hf_speed(shape(name), args.hf_tokens, 2, static)
                except Exception as e:  # noqa: BLE001 - report, do not hide, a baseline that failed
                    row[key] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        row["seconds"] = time.perf_counter() - started
        results["shapes"][name] = row
        save(results)
        log(json.dumps(row, indent=1, default=str))


def spec_section(args, results: dict, name: str, path: str, methods: list[str], hf: bool) -> None:
    from decodekit.bench.datasets import load_prompts
    from decodekit.bench.report import markdown_table, summarize
    from decodekit.bench.runner import run_bench, run_hf_baseline
    from decodekit.sampling import SamplingConfig

    engine = decodekit.load(path, device="cuda", dtype="bfloat16")
    prompts = load_prompts(args.spec_bench, args.per_category)
    log(f"== {name} (bf16, graphs over compiled blocks): {methods}, {len(prompts)} prompts x {args.new_tokens} tokens")
    # No smaller model shares these tokenizers offline: `draft` drafts with the target itself (its acceptance is
    # the ceiling, its draft passes cost what the target's do).
    self_draft = f"draft:model={path}"
    methods = [self_draft if m == "draft" else m for m in methods]
    runs = run_bench(engine, methods, prompts, args.new_tokens, SamplingConfig(), repeats=args.repeats,
                     show_progress=False)
    if self_draft in runs:
        runs["draft"] = runs.pop(self_draft)
    if hf and not args.skip_hf:
        subset = prompts[:: max(1, len(prompts) // args.hf_prompts)][: args.hf_prompts]
        for kind in ("hf", "hf-pld"):
            runs[kind] = run_hf_baseline(engine, kind, subset, args.new_tokens, 1)
    summary = summarize(runs)
    results["spec_bench"][name] = {"summary": summary, "table": markdown_table(summary),
                                   "accepted_by_position": {m: r.accepted_by_position for m, r in runs.items()}}
    save(results)
    log(results["spec_bench"][name]["table"])
    del engine
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--smollm2", default=None, help="path of the real SmolLM2 GGUF (or folder)")
    parser.add_argument("--gemma", default=None, help="path of the real Gemma 3 270M GGUF (or folder)")
    parser.add_argument("--gemma-methods", nargs="*", default=["plain", "pld", "suffix"])
    parser.add_argument("--spec-bench", default="spec-bench")
    parser.add_argument("--shapes", nargs="*", default=["smollm2-135m", "gemma3-270m", "llama3-8b"])
    parser.add_argument("--methods", nargs="*",
                        default=["plain", "pld", "suffix", "recycling", "aded", "lookahead", "layerskip", "draft"])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--eager-tokens", type=int, default=64, help="new tokens of the (slow) eager column")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--per-category", type=int, default=1)
    parser.add_argument("--hf-tokens", type=int, default=64, help="new tokens of the transformers shape baselines")
    parser.add_argument("--hf-prompts", type=int, default=1, help="Spec-Bench prompts timed with transformers")
    # transformers' static-cache baseline compiles its model for a minute or two per shape: the default keeps the
    # one-call run under the device's 10-minute limit.
    parser.add_argument("--hf-shapes", nargs="*", default=["smollm2-135m", "llama3-8b"])
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d"), "argv": sys.argv, "shapes": {}, "spec_bench": {}, "out": args.out}
    bandwidth = copy_bandwidth()
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    log(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    sections = {"shapes": lambda: shapes_section(args, results, bandwidth) if args.shapes else None,
                "smollm2": lambda: args.smollm2 and spec_section(args, results, "smollm2", args.smollm2,
                                                                  args.methods, hf=True),
                "gemma3-270m": lambda: args.gemma and spec_section(args, results, "gemma3-270m", args.gemma,
                                                                    args.gemma_methods, hf=False)}
    results["section_s"] = {}
    try:
        for name, run in sections.items():
            t = time.perf_counter()
            run()
            results["section_s"][name] = time.perf_counter() - t
            log(f"[{name}: {results['section_s'][name]:.0f} s]")
    finally:
        save(results)
    log("\n| shape | weights | floor tok/s | eager | graphs | graphs + compiled blocks | % of floor | HF dynamic | "
        "HF static |")
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) else str(v)  # noqa: E731
    for name, r in results["shapes"].items():
        log(f"| {name} | {r['weight_bytes'] / 1e9:.2f} GB | {r['floor_tok_s']:.0f} | {r['eager']['decode_tok_s']:.1f} |"
            f" {r['graphed']['decode_tok_s']:.1f} | {r['compiled']['decode_tok_s']:.1f} |"
            f" {100 * r['compiled']['of_floor']:.0f}% | {fmt(r.get('hf_dynamic_tok_s', '-'))} |"
            f" {fmt(r.get('hf_static_tok_s', '-'))} |")
        if "ttft_1k_s" in r:
            log(f"  ttft 1k: {1e3 * r['ttft_1k_s']:.1f} ms, 8k: {1e3 * r['ttft_8k_s']:.1f} ms")
    for name, r in results["spec_bench"].items():
        log(f"\n{name}:\n{r['table']}")

if __name__ == "__main__":
    main()
