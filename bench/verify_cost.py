"""What a verify pass costs by width: one sequence's pass of a root token + draft (a chain, or with --tree a binary
tree) of 1 to 64 tokens over a context of --context tokens, captured and replayed by the engine's runner
(`GraphRunner`), with attention through the paged tree kernel (`kernels.paged_tree`) and through the masked SDPA path
it replaces (--no-kernel: that one only; the engine's default while the kernel is off, `kernels.TREE_MAX_WIDTH`).
Width 1 is a decode step (the paged decode kernel on either path).

    PYTHONPATH=/root/site:$PWD DECODEKIT_CACHE=/root/dkcache python3 bench/verify_cost.py --model smollm2 \
        --device cuda --dtype bfloat16 [--tree] [--context 256] [--no-kernel] [--min-split 256,100000]

Per path and width: one pass through the runner first (capture, compilation; untimed), then --repeats timings of
--replays back-to-back replays of the captured graph, the device synchronized around each; median, in ms a replay.
`run` times whole runner passes instead (host layout, one copy, replay, the logits' argmax read on the host, as a
verify step does; `decodekit/bench/replay.py`). `kernels`: GPU kernels in one replay. --min-split: the tree kernel
with several `kernels.TREE_MIN_SPLIT` values (entries a split reads at least; a huge value: never split), a path each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402
from decodekit.engine.graphs import GraphRunner, kv_bucket  # noqa: E402
from decodekit.models import kernels  # noqa: E402
from decodekit.models.batch import RowSpec  # noqa: E402
from decodekit.models.kv_cache import SeqKV  # noqa: E402
from decodekit.speculative.base import DraftTree  # noqa: E402
from decodekit.speculative.draft_model import native_model  # noqa: E402

WIDTHS = (1, 2, 4, 8, 16, 32, 64)  # the runner's width buckets: each a graph of its own
TOKEN = 1


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, inner: int) -> float:
    """Median ms of one call of `fn`, over `repeats` timings of `inner` calls back to back."""
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        sync(device)
        times.append((time.perf_counter() - t) / inner * 1e3)
    return statistics.median(times)


def count_kernels(fn) -> int | None:
    if not torch.cuda.is_available():
        return None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events())


def verify_spec(kv: SeqKV, width: int, tree: bool) -> RowSpec:
    """The pass after `kv.length` entries: a root and `width - 1` nodes (node i's parent: (i - 1) // 2, or i - 1)."""
    if not tree or width == 1:
        return RowSpec(kv, [TOKEN] * width, list(range(kv.length, kv.length + width)), None, "all")
    draft = DraftTree([TOKEN] * (width - 1), [i // 2 for i in range(width - 1)])
    return RowSpec(kv, [TOKEN] * width, [kv.length + d for d in draft.depths()], draft.ancestor_mask(), "all")


def measure(name: str, runner: GraphRunner, kv: SeqKV, tree: bool, repeats: int, replays: int) -> list[dict]:
    """Per width: ms a replay, ms a runner pass, kernels a replay (graphs captured afresh for this path)."""
    device = runner.device
    rows, graphs = [], []
    for width in WIDTHS:
        spec = verify_spec(kv, width, tree)
        runner.run([spec])  # capture (and compilation)
        graphs.append(runner._pass(1, width, kv_bucket(kv.length + width, runner.pool.block_size)))
        rows.append({"replay": timed(graphs[-1].replay, device, repeats, replays),
                     "run": timed(lambda: runner.run([spec]).argmax(-1).tolist(), device, repeats, replays)})
        print(f"{name} width {width}: replay {rows[-1]['replay']:.3f} ms, run {rows[-1]['run']:.3f} ms",
              file=sys.stderr, flush=True)
    for row, static in zip(rows, graphs):  # after the timings: the profiler cannot cost them
        row["kernels"] = count_kernels(static.replay)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a built-in model, a folder, or a random: shape")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--context", type=int, default=256, help="entries in the cache before the pass")
    ap.add_argument("--tree", action="store_true", help="a binary draft tree instead of a chain")
    ap.add_argument("--no-kernel", action="store_true", help="only the masked SDPA path (the code before the kernel)")
    ap.add_argument("--min-split", default="", help="comma-separated kernels.TREE_MIN_SPLIT values, a path each")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--replays", type=int, default=50, help="back-to-back replays a timing")
    args = ap.parse_args()
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, prefix_caching=False, progress=False,
                            max_context=args.context + 2 * WIDTHS[-1], kv_tokens=args.context + 4 * WIDTHS[-1])
    splits = [int(s) for s in args.min_split.split(",") if s] or [kernels.TREE_MIN_SPLIT]
    # (name, widest row the tree kernel serves: 1 = none, kernels.TREE_MIN_SPLIT)
    paths = [("sdpa", 1, kernels.TREE_MIN_SPLIT)]
    if not args.no_kernel:
        paths += [(f"kernel/{s}" if len(splits) > 1 else "kernel", kernels.TREE_WIDEST, s) for s in splits]
    kv = SeqKV(engine.core.pool)  # on the CPU a runner's "replay" calls the pass: the script runs, no kernels
    kv.ensure(args.context + WIDTHS[-1])
    results = {}
    with torch.inference_mode():
        native_model(engine.model).forward_seq(kv, [TOKEN] * args.context, list(range(args.context)), None, "none")
        for name, widest, split in paths:
            kernels.TREE_MAX_WIDTH, kernels.TREE_MIN_SPLIT = widest, split
            # A fresh runner (its own graph memory pool) a path: the path is chosen while a pass is captured, and
            # re-capturing into a pool whose graphs were dropped failed on the H100 (a caching-allocator assert).
            runner = GraphRunner(native_model(engine.model), engine.core.pool)
            results[name] = measure(name, runner, kv, args.tree, args.repeats, args.replays)
    gpu = torch.cuda.get_device_name(runner.device) if runner.device.type == "cuda" else "cpu"
    print(f"verify pass cost: {args.model}, {gpu}, {str(engine.model.dtype).replace('torch.', '')}, context "
          f"{args.context}, {'binary tree' if args.tree else 'chain'}; ms a pass (median), x = / width 1")
    head = f"{'width':>5s}"
    for name in results:
        head += f" | {name + ' replay':>16s} {'x':>5s} {'run':>7s} {'x':>5s} {'kernels':>7s}"
    print(head)
    for i, width in enumerate(WIDTHS):
        line = f"{width:5d}"
        for rows in results.values():
            r, base = rows[i], rows[0]
            line += (f" | {r['replay']:16.3f} {r['replay'] / base['replay']:5.2f} {r['run']:7.3f} "
                     f"{r['run'] / base['run']:5.2f} {r['kernels'] if r['kernels'] is not None else '-':>7}")
        print(line)


if __name__ == "__main__":
    main()
