"""The paged attention kernels against masked attention over gathered keys and values (`kernel_reference.py`), and a
model's passes through them against its masked path. Off the GPU the kernels run in Triton's interpreter (a
subprocess with TRITON_INTERPRET=1); skipped where Triton is missing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

KERNELS = r'''
import torch
from decodekit.models import kernels
from kernel_reference import paged_decode_reference, paged_tree_reference

dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)


def inputs(hq, hkv, dim, rows, n, length, slots):
    k, v = torch.randn(slots, hkv, dim, generator=g), torch.randn(slots, hkv, dim, generator=g)
    q = torch.randn(n, hq, dim, generator=g)
    return q, k, v, torch.randint(0, slots, (rows, length), generator=g)


def on(*ts):
    return [t.to(dev) if t is not None else None for t in ts]


# (query heads, KV heads, head dim, rows, table length, pool slots, (programs, entries a split at least)): one split;
# then several, with windows starting and rows ending inside them (splits with nothing live).
DECODE = [(9, 3, 64, 3, 256, 600, (264, 256)), (4, 1, 32, 2, 384, 500, (264, 256)), (2, 2, 16, 1, 256, 300, (264, 256)),
          (4, 1, 32, 3, 400, 600, (12, 64)), (8, 2, 64, 2, 700, 900, (16, 128))]
for hq, hkv, dim, rows, length, slots, splits in DECODE:
    kernels.TREE_PROGRAMS, kernels.TREE_MIN_SPLIT = splits
    q, k, v, table = inputs(hq, hkv, dim, rows, rows, length, slots)
    hi = torch.randint(1, length + 1, (rows,), generator=g)
    hi[0] = length  # a full row
    lo = torch.clamp(hi - torch.randint(1, 200, (rows,), generator=g), min=0)  # a sliding window
    got = kernels.paged_decode(*on(q, k, v, table, lo, hi), 0.125).cpu()
    torch.testing.assert_close(got, paged_decode_reference(q, k, v, table, lo, hi, 0.125), rtol=1e-4, atol=1e-4)
    # One query a row is a tree of width 1: the tree kernel gives the decode kernel's result.
    tree1 = kernels.paged_tree(*on(q, k, v, table, lo, hi - 1, None), 0.125).cpu()
    torch.testing.assert_close(tree1, got, rtol=1e-5, atol=1e-5)

# (query heads, KV heads, head dim, rows, width, table length): SmolLM2's heads; 4 query heads a KV head, two query
# tiles and a table that ends inside a tile; no grouping at the widest captured width; width 2; wide heads (tiles of 32).
for hq, hkv, dim, rows, width, length in [(9, 3, 64, 3, 16, 256), (8, 2, 32, 3, 24, 300), (2, 2, 16, 1, 64, 128),
                                           (4, 1, 32, 2, 2, 64), (4, 2, 256, 2, 20, 96)]:
    q, k, v, table = inputs(hq, hkv, dim, rows, rows * width, length, 700)
    ctx = torch.randint(0, length - width + 1, (rows,), generator=g)  # rows of different lengths
    ctx[0] = length - width  # a full row
    lo = torch.clamp(ctx - torch.randint(1, 80, (rows,), generator=g), min=0)
    tree = (torch.rand(rows, width, width, generator=g) < 0.3).tril() | torch.eye(width, dtype=torch.bool)
    # The last row as graphs pad: no entries, the scratch slot everywhere, each query seeing only itself.
    ctx[-1], lo[-1], table[-1], tree[-1] = 0, 0, 0, torch.eye(width, dtype=torch.bool)
    # A sliding window: each query its own first entry (not in query order: the kernel starts at the row's least).
    lo_each = torch.minimum(lo[:, None] + torch.randint(0, 40, (rows, width), generator=g), ctx[:, None]).flatten()
    # A tree and a chain, lo = 0, one a row or one a query, over splits and the combine kernel; then one split
    # written directly. Few programs: the interpreter runs them one by one.
    for programs, lo_, tree_ in [(24, None, tree), (24, lo, None), (24, lo_each, tree), (1, lo, tree),
                                 (1, lo_each, None)]:
        kernels.TREE_KERNEL_PROGRAMS, kernels.TREE_MIN_SPLIT = programs, 32
        got = kernels.paged_tree(*on(q, k, v, table, lo_, ctx, tree_), 0.125).cpu()
        want = paged_tree_reference(q, k, v, table, lo_, ctx, tree_, 0.125)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
print("ok")
'''

MODEL = r'''
import torch
from decodekit.models import kernels
from decodekit.models.batch import RowSpec, build_batch
from decodekit.models.kv_cache import SeqKV
from decodekit.models.loader import load_random

dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
g = torch.Generator().manual_seed(0)
tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]).bool()
calls = []
for name in ("paged_tree", "paged_decode"):
    def counted(*a, op=getattr(kernels, name), name=name):
        calls.append(name)
        return op(*a)
    setattr(kernels, name, counted)
real = kernels.available
kernels.TREE_MAX_WIDTH = kernels.TREE_WIDEST  # the tree kernel on (off by default)
# Gemma 3: sliding-window layers (window 8) over the full pool and over rings (each query its own window start).
for shape, ring_pass in (("tiny-llama", None), ("tiny-gemma3", None), ("tiny-gemma3", 8)):
    model, _ = load_random(shape, dev, torch.float32)
    pool = model.make_pool(16, 16, ring_pass=ring_pass)
    kvs = [SeqKV(pool) for _ in range(3)]
    kernels.available = lambda q: False
    with torch.no_grad():
        for kv, n in zip(kvs, (40, 7, 23)):
            model.forward_seq(kv, torch.randint(0, 512, (n,), generator=g).tolist(), list(range(n)))
    # A verify pass: a tree row and a chain row padded to width 8 and 4 rows; single-token rows as a second group.
    rows = []
    for kv, t in [(kvs[0], tree), (kvs[1], None)]:
        w = 5 if t is not None else 3
        depth = t.sum(1).tolist() if t is not None else range(1, w + 1)
        kv.ensure(kv.length + w)
        rows.append(RowSpec(kv, torch.randint(0, 512, (w,), generator=g).tolist(), [kv.length + d - 1 for d in depth], t))
    kvs[2].ensure(kvs[2].length + 1)
    calls.clear()
    for batch in (build_batch([rows, [RowSpec(kvs[2], [3], [kvs[2].length])]], dev, widths=[8, 1], rows=[4, 2]),
                  build_batch([rows[1:]], dev, widths=[4], rows=[2])):  # chains only (as prefill chunks): no tree
        with torch.no_grad():
            kernels.available = lambda q: False
            want = model(batch, pool)
            kernels.available = lambda q: True
            got = model(batch, pool)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # Every layer of both passes reads through the tree kernel (window layers too); single tokens, the decode one.
    assert calls.count("paged_tree") == 2 * model.config.num_layers and "paged_decode" in calls, calls
kernels.available = real
print("ok")
'''


@pytest.mark.parametrize("code", [KERNELS, MODEL], ids=["kernels", "model"])
def test_kernels_match_masked_attention(code):
    tests = Path(__file__).resolve().parents[1]
    path = [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
