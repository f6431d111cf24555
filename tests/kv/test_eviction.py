"""Every eviction press's scores against its definition, computed by hand on small tensors."""
import math
from dataclasses import replace

import pytest
import torch

from decodekit.kv import (H2OPress, KnormPress, LayerKV, ScopePress, SnapKVPress, StreamingLLMPress,
                          accumulate_attention)
from decodekit.kv.base import kept_count

from kv_helpers import layer, topk_set


def test_knorm_scores_are_minus_key_norms_and_low_norms_are_kept():
    kv = layer(length=10)
    press = KnormPress(compression_ratio=0.5)
    h, n, d = kv.keys.shape
    by_hand = [[-math.sqrt(sum(float(kv.keys[i, j, c]) ** 2 for c in range(d))) for j in range(n)] for i in range(h)]
    assert torch.allclose(press.score(kv, 5), torch.tensor(by_hand), atol=1e-5)
    mean = [sum(by_hand[i][j] for i in range(h)) / h for j in range(n)]
    kept = press.select(kv)
    assert set(kept.tolist()) == topk_set(mean, 5)
    # Kept tokens have lower (mean) key norms than every evicted one.
    evicted = set(range(n)) - set(kept.tolist())
    assert max(-mean[j] for j in kept.tolist()) < min(-mean[j] for j in evicted)


@pytest.mark.parametrize("length,ratio,n_sink", [(12, 0.5, 2), (20, 0.75, 4), (9, 0.0, 4), (16, 0.25, 0)])
def test_streaming_llm_keeps_exactly_sinks_and_window(length, ratio, n_sink):
    kv = layer(length=length)
    kept = StreamingLLMPress(compression_ratio=ratio, n_sink=n_sink).compress(kv)
    n_keep = kept_count(length, ratio)
    expected = list(range(n_sink)) + list(range(length - (n_keep - n_sink), length))
    assert kept.positions.tolist() == [int(kv.positions[i]) for i in expected]
    assert torch.equal(kept.keys, kv.keys[:, expected])


def test_h2o_keeps_heavy_hitters_and_recent_window():
    kv = layer(length=12)
    press = H2OPress(compression_ratio=0.5, recent_ratio=0.5)
    n_keep = 6
    n_recent = 3
    mass = kv.attn_mass.mean(dim=0).tolist()
    recent = set(range(12 - n_recent, 12))
    heavy = topk_set(mass[: 12 - n_recent], n_keep - n_recent)
    assert press.select(kv).tolist() == sorted(recent | heavy)
    # recent_ratio 0: pure heavy hitters.
    assert set(H2OPress(compression_ratio=0.5, recent_ratio=0.0).select(kv).tolist()) == topk_set(mass, n_keep)


def test_h2o_accumulator_sums_attention_over_queries_and_group():
    g = torch.Generator().manual_seed(1)
    h_kv, groups, t, n_old, n = 2, 3, 2, 5, 7
    acc = torch.rand(h_kv, n_old, generator=g)
    weights = torch.rand(h_kv * groups, t, n, generator=g).softmax(dim=-1)
    out = accumulate_attention(acc, weights, h_kv)
    for kh in range(h_kv):
        for j in range(n):
            by_hand = sum(float(weights[kh * groups + r, s, j]) for r in range(groups) for s in range(t))
            by_hand += float(acc[kh, j]) if j < n_old else 0.0
            assert out[kh, j].item() == pytest.approx(by_hand, abs=1e-5)
    assert torch.allclose(accumulate_attention(None, weights, h_kv), weights.sum(1).reshape(h_kv, groups, n).sum(1))
    with pytest.raises(ValueError, match="multiple"):
        accumulate_attention(None, weights, 4)


def snapkv_by_hand(kv: LayerKV, kernel: int) -> list[list[float]]:
    """Window attention with explicit softmax loops, mean over the window, zero-padded average pooling, group mean."""
    h_kv, n, d = kv.keys.shape
    h_q, w, _ = kv.queries.shape
    groups, prefix = h_q // h_kv, n - w
    pooled_by_head = []
    for hq in range(h_q):
        keys = kv.keys[hq // groups]
        mean_attn = [0.0] * prefix
        for i in range(w):
            visible = n - w + i + 1
            logit = [sum(float(kv.queries[hq, i, c] * keys[j, c]) for c in range(d)) / math.sqrt(d)
                     for j in range(visible)]
            z = sum(math.exp(x) for x in logit)
            for j in range(prefix):
                mean_attn[j] += math.exp(logit[j]) / z / w
        half = kernel // 2
        pooled_by_head.append([sum(mean_attn[m] for m in range(j - half, j + half + 1) if 0 <= m < prefix) / kernel
                               for j in range(prefix)])
    return [[sum(pooled_by_head[kh * groups + r][j] for r in range(groups)) / groups for j in range(prefix)]
            for kh in range(h_kv)]


@pytest.mark.parametrize("kernel", [1, 3, 5])
def test_snapkv_scores_are_pooled_window_attention(kernel):
    kv = layer(length=11, window=3, groups=2)
    press = SnapKVPress(compression_ratio=0.5, kernel_size=kernel)
    expected = torch.tensor(snapkv_by_hand(kv, kernel))
    scores = press.score(kv, 5)
    assert torch.allclose(scores[:, :8].float(), expected, atol=1e-6)
    assert (scores[:, 8:] > scores[:, :8].max()).all()  # the window is protected
    kept = press.select(kv).tolist()
    mean = expected.mean(dim=0).tolist()
    assert kept == sorted(topk_set(mean, 5 - 3) | {8, 9, 10})


def test_snapkv_needs_window_queries():
    kv = replace(layer(), queries=None)
    with pytest.raises(ValueError, match="snapkv press needs queries"):
        SnapKVPress(compression_ratio=0.5).select(kv)


def scope_layer(prompt_len: int = 10, length: int = 16) -> LayerKV:
    kv = layer(length=length)
    return replace(kv, positions=torch.arange(length), prompt_len=prompt_len)


def test_scope_budgets_prompt_and_generated_tokens_separately():
    kv = scope_layer()
    press = ScopePress(prefill=KnormPress(), decode=H2OPress(recent_ratio=0.5), prefill_budget=4, decode_budget=4)
    norms = (-kv.keys.norm(dim=-1)).mean(dim=0).tolist()
    mass = kv.attn_mass.mean(dim=0).tolist()
    prompt = topk_set(norms[:10], 4)
    decode = {14, 15} | {10 + j for j in topk_set(mass[10:14], 2)}
    assert press.select(kv).tolist() == sorted(prompt | decode)
    # Generated tokens with tiny key norms would win a shared knorm budget; under SCOPE they cannot evict prompt
    # tokens, and the prompt side is chosen exactly as before.
    keys = kv.keys.clone()
    keys[:, 10:] *= 1e-3
    kept = press.select(replace(kv, keys=keys)).tolist()
    assert [i for i in kept if i < 10] == sorted(prompt)


def test_scope_keeps_sides_within_budget_whole_and_is_idempotent():
    kv = scope_layer()
    press = ScopePress(prefill=SnapKVPress(), prefill_budget=10, decode_budget=6)
    assert press.select(replace(kv, queries=None)).tolist() == list(range(16))  # nothing over budget: no scoring
    once = ScopePress(prefill=KnormPress(), prefill_budget=4, decode_budget=2).compress(kv)
    again = ScopePress(prefill=KnormPress(), prefill_budget=4, decode_budget=2).compress(once)
    assert torch.equal(once.positions, again.positions)
    with pytest.raises(ValueError, match="prompt_len"):
        press.select(layer())
    # After generation the window queries are the generated tokens': SnapKV cannot rank the prompt with them.
    with pytest.raises(ValueError, match="snapkv press needs queries"):
        ScopePress(prefill=SnapKVPress(), prefill_budget=4, decode_budget=6).select(kv)
