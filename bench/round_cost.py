"""What one fused draft round costs (`engine/graphs.py: StaticDraftRounds`: prompt lookup on the device, a chain
verify pass, greedy acceptance, the commit) against its parts: a plain decode step (a fused greedy chunk's step), a
verify pass of the same width alone, and the n-gram lookup alone. One sequence with --context entries, each graph
captured by the engine's runner and replayed after a fresh fill (untimed); median ms of --repeats replays.

    PYTHONPATH=/root/site:$PWD DECODEKIT_CACHE=/root/dkcache python3 bench/round_cost.py --model smollm2 \
        --device cuda --dtype bfloat16 --context 512
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import decodekit  # noqa: E402
from decodekit.engine.graphs import DRAFT_ROUNDS, GREEDY_SIZES, GraphRunner, StaticDraftRounds, kv_bucket  # noqa: E402
from decodekit.models import kernels  # noqa: E402
from decodekit.models.batch import RowSpec  # noqa: E402
from decodekit.models.kv_cache import SeqKV  # noqa: E402
from decodekit.speculative.draft_model import native_model  # noqa: E402
from decodekit.speculative.pld import PromptLookup  # noqa: E402
from verify_cost import count_kernels, sync, verify_spec  # noqa: E402


def timed_fresh(fill, replay, device: torch.device, repeats: int) -> float:
    """Median ms of one `replay`, each after its own `fill` (untimed): replays that move their state start alike."""
    times = []
    for _ in range(repeats):
        fill()
        sync(device)
        t = time.perf_counter()
        replay()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="a built-in model, a folder, or a random: shape")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--context", type=int, default=512, help="entries in the cache before the pass")
    ap.add_argument("--width", type=int, default=16, help="the verify width of a round (root + drafts)")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tree-kernel", action="store_true",
                    help="verify passes through the paged tree kernel (`kernels.TREE_MAX_WIDTH`; off by default)")
    args = ap.parse_args()
    if args.tree_kernel:
        kernels.TREE_MAX_WIDTH = kernels.TREE_WIDEST
    ahead = GREEDY_SIZES[0] * 16  # what the engine reserves ahead of a fused call (core.py)
    engine = decodekit.load(args.model, device=args.device, dtype=args.dtype, prefix_caching=False, progress=False,
                            max_context=args.context + 2 * ahead, kv_tokens=args.context + 4 * ahead)
    model, pool = native_model(engine.model), engine.core.pool
    runner = GraphRunner(model, pool)
    dev, w, c = runner.device, args.width, args.context
    kv = SeqKV(pool)
    kv.ensure(c + ahead)
    length = kv_bucket(c + ahead, pool.block_size)
    motif = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]  # a context lookup finds again
    context = (motif * (c // len(motif) + 1))[:c + 1]
    ms, counts = {}, {}
    with torch.inference_mode():
        model.forward_seq(kv, context[:c], list(range(c)), None, "none")
        root = RowSpec(kv, [context[-1]], [c], None, "none")
        steps = GREEDY_SIZES[0]
        chunk = runner._pass(1, 1, length, steps)
        verify = runner._pass(1, w, length)
        rounds = StaticDraftRounds(runner, 1, w, length, kv_bucket(c + ahead + w, pool.block_size), DRAFT_ROUNDS,
                                   PromptLookup(num_draft=w - 1, on_device=True))
        history = torch.tensor([context + [0] * (rounds.history.shape[1] - len(context))], device=dev)
        filled = torch.tensor([c + 1], device=dev)
        lookup = runner.capture(lambda: rounds.drafter.propose_on_device(history, filled, w - 1))
        cases = {  # name: (fill, graph, passes a replay)
            "plain step": (lambda: chunk.fill([root], tree=False), chunk.graph, steps),
            f"verify pass, width {w}": (lambda: verify.fill([verify_spec(kv, w, tree=False)], tree=True),
                                        verify.graph, 1),
            f"draft round, width {w}": (lambda: rounds.fill_rounds([root], [context], w - 1), rounds.graph,
                                        DRAFT_ROUNDS),
            "n-gram lookup alone": (lambda: None, lookup, 1),
        }
        for name, (fill, graph, passes) in cases.items():
            ms[name] = timed_fresh(fill, graph.replay, dev, args.repeats) / passes
            fill()
            found = count_kernels(graph.replay)
            counts[name] = None if found is None else found / passes
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"fused draft round cost: {args.model}, {gpu}, {str(model.dtype).replace('torch.', '')}, context {c}, "
          f"KV length read {length}, tree kernel {'on' if args.tree_kernel else 'off'}; ms per pass (median of "
          f"{args.repeats}), x = / plain step")
    base = ms["plain step"]
    for name in cases:
        k = counts[name]
        print(f"{name:24s} {ms[name]:8.3f} ms {ms[name] / base:6.2f}x  kernels {'-' if k is None else f'{k:.0f}'}")


if __name__ == "__main__":
    main()
