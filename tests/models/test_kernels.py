"""The paged decode attention kernel against masked attention over gathered keys and values. Off the GPU the
kernel runs in Triton's interpreter (a subprocess with TRITON_INTERPRET=1); skipped where Triton is missing."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

CHECK = r'''
import torch
from decodekit.models import kernels

dev = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
for hq, hkv, dim, rows, length, slots in [(9, 3, 64, 3, 256, 600), (4, 1, 32, 2, 384, 500), (2, 2, 16, 1, 256, 300)]:
    k = torch.randn(slots, hkv, dim, generator=g)
    v = torch.randn(slots, hkv, dim, generator=g)
    q = torch.randn(rows, hq, dim, generator=g)
    table = torch.randint(0, slots, (rows, length), generator=g)
    hi = torch.randint(1, length + 1, (rows,), generator=g)
    hi[0] = length  # a full row
    lo = torch.clamp(hi - torch.randint(1, 200, (rows,), generator=g), min=0)  # a sliding window
    got = kernels.paged_decode(*(t.to(dev) for t in (q, k, v, table, lo, hi)), 0.125).cpu()
    keys = k[table].transpose(1, 2)
    values = v[table].transpose(1, 2)
    idx = torch.arange(length)
    mask = ((idx >= lo[:, None]) & (idx < hi[:, None]))[:, None, None, :]
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], keys, values, attn_mask=mask, scale=0.125,
                                                            enable_gqa=True)[:, :, 0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
print("ok")
'''


def test_paged_decode_matches_masked_attention():
    if torch.cuda.is_available():
        env = dict(os.environ)
    else:
        env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
