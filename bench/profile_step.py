"""Where a decode step's time goes on the GPU: engine step vs graph replay alone, kernels per step, compile time.

    python bench/profile_step.py [SHAPE ...] [--compile]
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import decodekit  # noqa: E402


def profile(shape: str, compile_blocks: bool) -> None:
    engine = decodekit.load(f"random:{shape}", device="cuda", dtype="bfloat16", compile=compile_blocks)
    ids = list(range(3, 67))
    t = time.perf_counter()
    engine.generate(ids, 32, ignore_eos=True)  # capture (and compile) happen here
    print(f"{shape} compile={compile_blocks}: first generate {time.perf_counter() - t:.1f} s")
    fused = engine.generate(ids, 256, ignore_eos=True)
    print(f"  fused greedy chunks: {fused.stats.tokens_per_s:.0f} tok/s")
    keep, engine.model.greedy = engine.model.greedy, None
    r = engine.generate(ids, 256, ignore_eos=True)
    engine.model.greedy = keep
    ms = 1e3 / r.stats.tokens_per_s
    graph, _, _ = engine.model.graphs[1]
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(200):
        graph.replay()
    torch.cuda.synchronize()
    replay = (time.perf_counter() - t) / 200 * 1e3
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    gpu_us = sum(e.device_time for e in kernels)
    print(f"  engine {r.stats.tokens_per_s:.0f} tok/s = {ms:.3f} ms/token; replay alone {replay:.3f} ms; "
          f"host overhead ~{ms - replay:.3f} ms; {len(kernels)} kernels, {gpu_us / 1e3:.3f} ms summed kernel time")
    names: dict[str, list[float]] = {}
    for e in kernels:
        names.setdefault(e.name[:70], []).append(e.device_time)
    for n, ts in sorted(names.items(), key=lambda kv: -sum(kv[1]))[:10]:
        print(f"    {len(ts):4d} x {sum(ts) / len(ts):6.1f} us  {n}")
    for width in (2, 8, 16):
        graph, _, _ = engine.model.graphs[width]
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(100):
            graph.replay()
        torch.cuda.synchronize()
        print(f"  width {width}: replay {(time.perf_counter() - t) / 100 * 1e3:.3f} ms")


def experiments(argv: list[str]) -> None:
    """Kernel variants tried under torch.compile only (the library's eager path is untouched)."""
    import torch.nn.functional as F

    if "--gemv" in argv:  # M=1 matmul as multiply + row sum: one fused reduction kernel instead of a GEMM
        linear = torch.nn.Linear.forward

        def gemv(self, x):
            if torch.compiler.is_compiling() and x.numel() == x.shape[-1]:
                out = (x.unsqueeze(-2) * self.weight).sum(-1)
                return out if self.bias is None else out + self.bias
            return linear(self, x)
        torch.nn.Linear.forward = gemv
    if "--no-gemv" in argv:
        import decodekit.models.transformer as tr

        tr.linear = lambda layer, x: layer(x)
    for a in argv:  # --gemv-rows=N: verify widths up to N tokens also as fused reductions
        if a.startswith("--gemv-rows="):
            import decodekit.models.transformer as tr

            tr.GEMV_MAX_ROWS = int(a.split("=")[1])
    if "--ew-attn" in argv:  # single-query attention as multiply + reductions, grouped by KV head (no repeat)
        sdpa = F.scaled_dot_product_attention

        def ew(q, k, v, attn_mask=None, scale=None, enable_gqa=False):
            if not torch.compiler.is_compiling() or q.shape[-2] != 1:
                return sdpa(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
            b, h, _, d = q.shape
            hk = k.shape[1]
            qg = q.view(b, hk, h // hk, 1, d)
            s = (qg * k[:, :, None]).sum(-1).float() * scale  # [b, hk, rep, L]
            s = s.masked_fill(~attn_mask.view(b, 1, 1, -1), float("-inf")).softmax(-1)
            return (s[..., None] * v[:, :, None].float()).sum(-2).to(q.dtype).view(b, h, 1, d)
        F.scaled_dot_product_attention = ew
    if "--math-attn" in argv:  # attention as plain matmuls + softmax that inductor fuses
        sdpa = F.scaled_dot_product_attention

        def math(q, k, v, attn_mask=None, scale=None, enable_gqa=False):
            if not torch.compiler.is_compiling():
                return sdpa(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            s = (q @ k.transpose(-1, -2)).float() * scale
            return s.masked_fill(~attn_mask, float("-inf")).softmax(-1).to(q.dtype) @ v
        F.scaled_dot_product_attention = math


if __name__ == "__main__":
    experiments(sys.argv)
    shapes = [a for a in sys.argv[1:] if not a.startswith("--")] or ["smollm2-135m"]
    for s in shapes:
        profile(s, "--compile" in sys.argv)
