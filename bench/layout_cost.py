"""What a step boundary costs the host in KV bookkeeping: laying out B rows over long block tables
(`layout_group`, what every step's static pass is filled from) and giving B sequences' blocks back (`SeqKV.free`),
on the pool of a sliding-window model (tiny Gemma 3: the bookkeeping does not depend on the layers' sizes).

    python3 bench/layout_cost.py --batch 64 --length 31055
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from decodekit.models.batch import RowSpec, layout_group  # noqa: E402
from decodekit.models.kv_cache import SeqKV  # noqa: E402
from decodekit.models.loader import load_random  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--length", type=int, default=31055, help="entries each sequence holds")
    ap.add_argument("--table", type=int, default=32768, help="entries the pass's tables span (its KV bucket)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    model, _ = load_random("tiny-gemma3", torch.device("cpu"), torch.float32)
    bs = 16
    pool = model.make_pool(args.batch * (args.table // bs + 2) + 16, bs, ring_pass=64)
    kvs = [SeqKV(pool) for _ in range(args.batch)]
    for kv in kvs:
        kv.ensure(args.length + 256)
        kv.length = args.length
    specs = [RowSpec(kv, [1], [args.length], None, "none") for kv in kvs]
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        layout_group(specs, 1, args.batch, args.table, bs)
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    for kv in kvs:
        kv.free()
    freed = time.perf_counter() - t0
    print(f"batch {args.batch}, {args.length} entries a row, tables of {args.table}: layout_group "
          f"{statistics.median(times) * 1e3:.1f} ms (median of {args.repeats}), free {freed * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
