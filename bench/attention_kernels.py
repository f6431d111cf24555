"""What the paged attention kernels (`decodekit/models/kernels.py`) cost alone, and under which launch settings: each
case a pool of random keys and values, a table of scattered blocks (the paged cache's layout), timed as --calls
back-to-back calls captured in one CUDA graph (no host launch cost), median of --repeats replays, in microseconds a
call; `GB/s` is the keys, values and slot indices the call must read over that time (the H100's copy bandwidth is
about 3,000 GB/s).

    python3 bench/attention_kernels.py --out /root/out/kernels.json [--shape gemma3|smollm2] [--quick]

Cases (Gemma 3 270M heads: 4 query heads, 1 KV head, dimension 256): decode over a 512-entry window (its sliding-
window rings, a self-speculative draft's view) and over 32k entries (its global layers), verify trees of width 8
and 16 over 32k, at batch 32 and 64. Each case runs under the module's current settings ("default") and under the
variants of a sweep (splits, tile sizes, warps, pipeline stages); the table shows which is fastest.
"""
from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decodekit.models import kernels  # noqa: E402

SHAPES = {"gemma3": (4, 1, 256), "smollm2": (9, 3, 64)}  # query heads, KV heads, head dim
BLOCK = 16  # the paged cache's block size


def case_inputs(rows: int, length: int, width: int, heads: tuple[int, int, int], device: str) -> dict:
    """A pool with `rows` rows of `length` entries each in scattered blocks, queries of `width` a row."""
    hq, hkv, dim = heads
    blocks = rows * (length + width + BLOCK - 1) // BLOCK + 1
    g = torch.Generator(device="cpu").manual_seed(0)
    order = torch.randperm(blocks - 1, generator=g)[: rows * ((length + width + BLOCK - 1) // BLOCK)] + 1
    per_row = order.view(rows, -1)
    entries = torch.arange(per_row.shape[1] * BLOCK)
    table = (per_row[:, entries // BLOCK] * BLOCK + entries % BLOCK).to(torch.int32)[:, : length + width]
    k = torch.randn(blocks * BLOCK, hkv, dim, generator=g).to(torch.bfloat16)
    v = torch.randn(blocks * BLOCK, hkv, dim, generator=g).to(torch.bfloat16)
    q = torch.randn(rows * width, hq, dim, generator=g).to(torch.bfloat16)
    return {k_: t.to(device) for k_, t in dict(q=q, k=k, v=v, table=table).items()}


def read_bytes(rows: int, entries: int, heads: tuple[int, int, int]) -> int:
    _, hkv, dim = heads
    return rows * entries * (2 * hkv * dim * 2 + 4)


def time_call(fn, calls: int, repeats: int) -> float:
    """Median microseconds a call, `calls` calls captured in one graph."""
    fn()  # compile, warm
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def settings_sweep(quick: bool) -> list[dict]:
    """Module settings to try (names of `kernels` constants)."""
    base = [dict()]
    programs = [dict(TREE_PROGRAMS=p) for p in ((528, 1056) if quick else (528, 1056, 2112))]
    short = [dict(TREE_SHORT_SPLIT=s) for s in (32, 128)]
    tiles = [dict(DECODE_WARPS=w, DECODE_STAGES=s, BLOCK_N=n)
             for w, s, n in itertools.product((2, 4, 8), (1, 2, 3, 4), (32, 64, 128))
             if not (quick and (w, n) not in ((4, 64), (4, 32), (8, 64)))]
    tree = [dict(TREE_WIDE_TILE=tile) for tile in itertools.product((16, 32, 64), (4, 8), (1, 2, 3))]
    tree += [dict(TREE_WIDE_ROWS=64, TREE_WIDE_TILE=tile) for tile in itertools.product((32, 64), (4, 8), (1, 2))]
    return base + programs + short + tiles + tree


def run(args: argparse.Namespace) -> dict:
    heads = SHAPES[args.shape]
    hq, hkv, dim = heads
    scale = dim ** -0.5
    defaults = {name: getattr(kernels, name) for s in settings_sweep(False) for name in s}
    results = []
    cases = [("decode", rows, length, 1) for rows in args.batches for length in (512, args.context)
             if "decode" in args.kinds]
    cases += [("tree", rows, args.context, width) for rows in args.batches for width in args.widths
              if "tree" in args.kinds]
    for kind, rows, length, width in cases:
        t = case_inputs(rows, length, width, heads, "cuda")
        if kind == "decode":
            hi = torch.full((rows,), length, dtype=torch.int32, device="cuda")
            lo = torch.zeros_like(hi)
            table = t["table"][:, :length]
            fn = lambda: kernels.paged_decode(t["q"], t["k"], t["v"], table, lo, hi, scale)  # noqa: E731
        else:
            ctx = torch.full((rows,), length, dtype=torch.int32, device="cuda")
            fn = lambda: kernels.paged_tree(t["q"], t["k"], t["v"], t["table"], None, ctx, None, scale)  # noqa: E731
        want = fn().float()
        bytes_ = read_bytes(rows, length + width - 1, heads)
        rows_out = []
        for setting in settings_sweep(args.quick):
            relevant = not any(name.startswith("TREE_WIDE") for name in setting) if kind == "decode" else \
                not any(name.startswith("DECODE") or name == "BLOCK_N" for name in setting)
            if not relevant:
                continue
            for name, value in setting.items():
                setattr(kernels, name, value)
            try:
                err = (fn().float() - want).abs().max().item()
                us = time_call(fn, args.calls, args.repeats)
                rows_out.append(dict(setting=setting, us=round(us, 2), gb_s=round(bytes_ / us / 1e3, 1),
                                     max_err=err))
            except Exception as e:  # a setting the compiler rejects (registers, shared memory): say so, go on
                rows_out.append(dict(setting=setting, error=f"{type(e).__name__}: {str(e)[:200]}"))
            finally:
                for name in setting:
                    setattr(kernels, name, defaults[name])
        ok = [r for r in rows_out if "us" in r]
        best = min(ok, key=lambda r: r["us"])
        print(f"{kind:6s} rows {rows:3d} entries {length:6d} width {width:2d}: default {ok[0]['us']:8.2f} us "
              f"({ok[0]['gb_s']} GB/s); best {best['us']:8.2f} us ({best['gb_s']} GB/s) {best['setting']}",
              flush=True)
        results.append(dict(kind=kind, rows=rows, entries=length, width=width, heads=heads, runs=rows_out))
    return dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), command=" ".join(sys.argv),
                defaults=defaults, cases=results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="gemma3")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64])
    p.add_argument("--widths", type=int, nargs="+", default=[8, 16])
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--kinds", nargs="+", choices=["decode", "tree"], default=["decode", "tree"])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a smaller sweep")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    report = run(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
