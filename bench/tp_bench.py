"""Tensor-parallel decode speed at batch 1 against the aggregate weight-read floor (issue #17).

    python3 bench/tp_bench.py --out $OUT --device cuda --runs llama3-70b:2,4 llama3-8b:1,2,4

Each run loads `random:<shape>` split over N ranks (`decodekit.load(..., tensor_parallel=N)`: one GPU each from
`--device` on; random weights are drawn per rank directly into its shard, so a 70B model is never whole on one
device), generates `--new-tokens` greedily from a `--prompt-len` prompt (EOS ignored), and reports decode tok/s
(generated tokens after the first over the time after the first token; median of `--repeats`, one warm-up run).

The floor: at batch 1 every decode step reads every weight once, spread over N devices, so the fastest possible
rate is N * bandwidth / weight bytes (KV reads at these short contexts are a fraction of a percent and are left
out). `bandwidth` is one device's, measured here by a large device-to-device copy (read + write bytes per second),
or given with `--bandwidth` (GB/s). Target of the issue: the 70B shape on 4 GPUs at >= 75% of its floor.

On the CPU (gloo) the same script runs on tiny shapes (tests/bench/test_tp_bench.py); its numbers there only
check the logic.
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
from decodekit.models.config import shape  # noqa: E402
from decodekit.models.transformer import Transformer  # noqa: E402


def parse_runs(specs: list[str]) -> list[tuple[str, int]]:
    """`shape:1,2,4` -> [(shape, 1), (shape, 2), (shape, 4)]."""
    runs = []
    for spec in specs:
        name, _, sizes = spec.partition(":")
        shape(name)  # unknown shape: its error now, not after other runs
        runs += [(name, int(n)) for n in (sizes or "1").split(",")]
    return runs


def weight_bytes(name: str, dtype: torch.dtype) -> int:
    """Bytes of the whole model's weights (counted on meta tensors: nothing is allocated); tied embeddings once."""
    with torch.device("meta"):
        model = Transformer(shape(name))
    return sum(p.numel() for p in model.parameters()) * torch.empty((), dtype=dtype).element_size()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, size: int = 2 << 30) -> float:
    """One device's memory bandwidth in bytes/s: a `size`-byte copy (read + write), best of 5."""
    x = torch.empty(size, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(6):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * size / best


def decode_rate(engine, prompt_len: int, new_tokens: int, repeats: int) -> float:
    """Median decode tokens/s of one greedy generation at batch 1 (after a warm-up run)."""
    prompt = [(7 * i) % 200 + 3 for i in range(prompt_len)]
    rates = []
    for i in range(repeats + 1):
        sync(engine.device)
        r = engine.generate(prompt, new_tokens, ignore_eos=True)
        s = r.stats
        if i:  # the first run warms up (compilation, graph capture)
            rates.append((s.generated_tokens - 1) / max(s.total_time_s - s.time_to_first_token_s, 1e-9))
    return statistics.median(rates)


def run_one(name: str, world: int, args: argparse.Namespace, bandwidth: float) -> dict:
    dtype = getattr(torch, args.dtype)
    engine = decodekit.load(f"random:{name}", device=args.device, dtype=dtype, progress=False,
                            tensor_parallel=world, cuda_graphs=args.cuda_graphs, compile=args.compile)
    try:
        local = getattr(engine.model, "local", engine.model)
        rate = decode_rate(engine, args.prompt_len, args.new_tokens, args.repeats)
    finally:
        if world > 1:
            engine.model.close()
    total = weight_bytes(name, dtype)
    floor = world * bandwidth / total
    return {"shape": name, "world": world, "dtype": args.dtype, "tok_s": rate, "weight_bytes": total,
            "rank0_weight_bytes": sum(p.numel() * p.element_size() for p in local.parameters()),
            "floor_tok_s": floor, "fraction_of_floor": rate / floor}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", default=["llama3-70b:2,4", "llama3-8b:1,2,4"], metavar="SHAPE:N,N")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--bandwidth", type=float, default=None, help="one device's GB/s (default: measured)")
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the blocks (default: with CUDA graphs, as decodekit.load does)")
    p.add_argument("--out", default=None, help="folder for tp_bench.json (written after every run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda":
        args.cuda_graphs = False
    runs = parse_runs(args.runs)
    bandwidth = args.bandwidth * 1e9 if args.bandwidth else copy_bandwidth(device, 2 << 30 if device.type == "cuda"
                                                                           else 64 << 20)
    print(f"bandwidth of one device: {bandwidth / 1e9:.0f} GB/s", flush=True)
    results = []
    for name, world in runs:
        results.append(run_one(name, world, args, bandwidth))
        r = results[-1]
        print(f"{name:12s} x{world}: {r['tok_s']:8.1f} tok/s, floor {r['floor_tok_s']:8.1f} "
              f"({100 * r['fraction_of_floor']:.0f}%)", flush=True)
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            Path(args.out, "tp_bench.json").write_text(json.dumps(
                {"bandwidth_bytes_s": bandwidth, "device": str(device), "runs": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
