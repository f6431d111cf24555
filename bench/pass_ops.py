"""How many torch ops a captured pass runs outside the model's blocks (layouts, masks, window bounds, rotary
gathers, the output layer): inside a CUDA graph each is a kernel that runs every replay, a few microseconds apiece.
Counted on the CPU with the GPU's attention path (the Triton kernels' torch references in their place), through the
engine's graph runner in eager mode, for fused draft rounds of `--method` (magicdec by default).

    python3 bench/pass_ops.py [--shape tiny-gemma3] [--method magicdec]

Counts every dispatched op (views and no-op casts too, which launch nothing on a GPU): compare counts of one shape
before and after a change, not with kernel counts.
"""
from __future__ import annotations

import argparse
import collections
import random
import sys
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import decodekit  # noqa: E402
import kernel_reference  # noqa: E402
from decodekit.engine.api import Engine  # noqa: E402
from decodekit.models import kernels  # noqa: E402
from decodekit.models.transformer import Block  # noqa: E402


class PassOps(TorchDispatchMode):
    """Counts ops per pass of `runner.graph_model`, leaving out what runs inside blocks and attention kernels."""

    def __init__(self) -> None:
        super().__init__()
        self.passes: list[tuple[int, collections.Counter]] = []  # (width, ops)
        self.inside = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.passes and not self.inside:
            self.passes[-1][1][str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def opaque(self, fn):
        def run(*a, **k):
            self.inside += 1
            try:
                return fn(*a, **k)
            finally:
                self.inside -= 1
        return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="tiny-gemma3")
    ap.add_argument("--method", default="magicdec")
    args = ap.parse_args()
    counter = PassOps()
    kernels.available = lambda q: True  # the GPU's attention path, with the kernels' references
    kernels.paged_decode = counter.opaque(kernel_reference.paged_decode_reference)
    kernels.paged_tree = counter.opaque(kernel_reference.paged_tree_reference)
    Block.forward = counter.opaque(Block.forward)
    engine = decodekit.load(f"random:{args.shape}", device="cpu", dtype="float32", progress=False)
    graphed = Engine(engine.model, engine.tokenizer, cuda_graphs=True)
    runner = graphed.core.runner
    forward = runner.graph_model

    def counted(batch, pool, **kw):
        counter.passes.append((batch.groups[0].width, collections.Counter()))
        out = forward(batch, pool, **kw)
        counter.passes.append((0, collections.Counter()))  # what runs between passes
        return out
    runner.graph_model = counted
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(300)] for _ in range(2)]
    with counter:
        graphed.generate(prompts, 20, ignore_eos=True, method=args.method, adaptive=False)
    for width, name in ((1, "single-token pass"), (None, "verify pass"), (0, "between passes")):
        ops = [c for w, c in counter.passes if (w == width if width is not None else w > 1)]
        if ops:
            last = ops[-2] if len(ops) > 1 else ops[-1]
            sizes = collections.Counter(sum(c.values()) for c in ops)
            print(f"{name} ({len(ops)} seen; ops: count {dict(sorted(sizes.items()))}); one of them: "
                  + ", ".join(f"{k.removeprefix('aten.')} {v}" for k, v in last.most_common()))


if __name__ == "__main__":
    main()
