"""EMS: the Global-Local score by hand, head-wise selection, and evict-then-merge against a per-token loop."""
import math
from dataclasses import replace

import pytest
import torch

from decodekit.kv import EMSPress, reduce_headwise
from decodekit.kv.presses.ems import global_local_scores

from kv_helpers import layer


def global_local_by_hand(kv) -> list[list[float]]:
    h_kv, n, d = kv.keys.shape
    h_q, w, _ = kv.queries.shape
    groups = h_q // h_kv
    last = int(kv.positions.max())
    out = []
    for kh in range(h_kv):
        glob = [float(kv.attn_mass[kh, j]) / (last + 1 - int(kv.positions[j])) for j in range(n)]
        local = [0.0] * n
        for r in range(groups):
            for i in range(w):
                visible = n - w + i + 1
                logit = [sum(float(kv.queries[kh * groups + r, i, c] * kv.keys[kh, j, c]) for c in range(d))
                         / math.sqrt(d) for j in range(visible)]
                z = sum(math.exp(x) for x in logit)
                for j in range(visible):
                    local[j] += math.exp(logit[j]) / z / (w * groups)
        gs, ls = sum(glob), sum(local)
        out.append([max(glob[j] / gs, local[j] / ls) for j in range(n)])
    return out


def test_global_local_score_matches_definition():
    kv = layer(length=9, window=3, groups=2)
    assert torch.allclose(global_local_scores(kv), torch.tensor(global_local_by_hand(kv), dtype=torch.float64),
                          atol=1e-6)


def test_global_score_removes_the_causal_mask_bias():
    # Equal attention per query seen: an early token gathered more mass only because more queries saw it.
    n = 8
    kv = layer(length=n, window=1)
    positions = torch.arange(n)
    mass = (n - positions).double().expand(2, -1).clone()  # each key got 1.0 from every query that saw it
    kv = replace(kv, positions=positions, attn_mass=mass, queries=torch.zeros(4, 1, 8))  # uniform local attention
    assert torch.allclose(global_local_scores(kv), torch.full((2, n), 1.0 / n, dtype=torch.float64))


def merge_by_loop(kv, scores, kept, threshold):
    """Per head, per evicted token: join the most similar kept key if similar enough; weighted means."""
    h, n, d = kv.keys.shape
    out_k, out_v = [], []
    for i in range(h):
        keep = kept[i].tolist()
        acc_k = {c: kv.keys[i, c].double() * scores[i, c] for c in keep}
        acc_v = {c: kv.values[i, c].double() * scores[i, c] for c in keep}
        weight = {c: float(scores[i, c]) for c in keep}
        for j in range(n):
            if j in keep:
                continue
            sims = [float(torch.nn.functional.cosine_similarity(kv.keys[i, j].double(), kv.keys[i, c].double(), dim=0))
                    for c in keep]
            best = max(range(len(keep)), key=lambda m: sims[m])
            if sims[best] >= threshold:
                c = keep[best]
                acc_k[c] = acc_k[c] + kv.keys[i, j].double() * scores[i, j]
                acc_v[c] = acc_v[c] + kv.values[i, j].double() * scores[i, j]
                weight[c] += float(scores[i, j])
        out_k.append(torch.stack([acc_k[c] / weight[c] for c in keep]))
        out_v.append(torch.stack([acc_v[c] / weight[c] for c in keep]))
    return torch.stack(out_k), torch.stack(out_v)


@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.3, 1.0])
def test_evict_then_merge_matches_a_per_token_loop(threshold):
    kv = layer(length=14, window=3, groups=2, d=4, seed=3)  # d=4: random keys are often similar
    press = EMSPress(compression_ratio=0.5, merge_threshold=threshold)
    out = press.compress_headwise(kv)
    scores = global_local_scores(kv)
    kept = scores.topk(7, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(out.indices, kept)  # head-wise: each head its own top tokens
    assert torch.equal(out.positions, kv.positions[kept])
    exp_k, exp_v = merge_by_loop(kv, scores, kept, threshold)
    assert torch.allclose(out.keys.double(), exp_k, atol=1e-5) and torch.allclose(out.values.double(), exp_v, atol=1e-5)
    if threshold == 1.0:  # nothing is similar enough: pure head-wise eviction
        assert torch.equal(out.keys, kv.keys.gather(1, kept[..., None].expand(-1, -1, 4)))


def test_duplicate_merges_and_orthogonal_token_goes_to_the_zero_class():
    kv = layer(h_kv=1, length=6, d=4, groups=1, window=1)
    keys = torch.eye(4).repeat(2, 1)[:6][None].clone()  # tokens 4, 5 repeat the directions of tokens 0, 1
    keys[0, 4] *= 2.0
    mass = torch.tensor([[0.0, 0.0, 9.0, 9.0, 0.0, 0.0]])
    kv = replace(kv, keys=keys, attn_mass=mass, positions=torch.arange(6),
                 queries=torch.zeros(1, 1, 4))  # uniform local attention: ranking comes from the global mass
    press = EMSPress(compression_ratio=0.5, merge_threshold=0.9)
    scores = global_local_scores(kv)
    out = press.compress_headwise(kv)
    kept = out.indices[0].tolist()
    assert len(kept) == 3 and 2 in kept and 3 in kept
    # Tokens along e0 (0 and 4) merge into whichever of them is kept; tokens along e1 (1, 5) likewise.
    # Nothing is similar to e2 or e3: those centres are unchanged, and the other direction's tokens were dropped.
    assert torch.equal(out.keys[0, kept.index(2)], keys[0, 2]) and torch.equal(out.keys[0, kept.index(3)], keys[0, 3])
    merged = 0
    for direction in (0, 1):
        members = [j for j in range(6) if keys[0, j].argmax() == direction]
        centre = [j for j in members if j in kept]
        if centre:
            w = scores[0, members]
            expected = (keys[0, members].double() * w[:, None]).sum(0) / w.sum()
            assert torch.allclose(out.keys[0, kept.index(centre[0])].double(), expected, atol=1e-6)
            merged += 1
    assert merged == 1


def test_paged_cache_reduction_of_headwise_choices():
    kv = layer(length=12)
    press = EMSPress(compression_ratio=0.5)
    chosen = press.select_headwise(kv)
    reduced = reduce_headwise(chosen, press.score(kv, 6), 6)
    assert len(reduced) == 6 and reduced.tolist() == sorted(reduced.tolist())
    votes = torch.zeros(12)
    for row in chosen:
        votes[row] += 1
    # Every token kept by all heads survives the reduction; no token kept by no head does while others remain.
    assert set(torch.nonzero(votes == 2)[:, 0].tolist()) <= set(reduced.tolist())
    assert (votes[reduced] > 0).all()
