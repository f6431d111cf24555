"""TidalDecode and Quest: with every token selected they are full attention exactly; otherwise they attend to
exactly the selected tokens; Quest's page score is an upper bound of q . k."""
import math

import pytest
import torch
from torch.nn import functional as F

from decodekit.kv import QuestPress, TidalDecode
from decodekit.kv.attention import attend


def data(h_kv=2, groups=3, t=1, n=37, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(h_kv * groups, t, d, generator=g)
    k = torch.randn(h_kv, n, d, generator=g)
    v = torch.randn(h_kv, n, d, generator=g)
    return q, k, v


def sdpa(q, k, v, mask=None):
    groups = q.shape[0] // k.shape[0]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0),
                                          attn_mask=mask)


def test_full_attention_matches_torch_sdpa():
    q, k, v = data(t=3)
    assert torch.allclose(attend(q, k, v), sdpa(q, k, v), atol=1e-5)


# ---- TidalDecode ----

@pytest.mark.parametrize("t", [1, 2])
def test_tidal_with_budget_l_is_full_attention_exactly(t):
    q, k, v = data(t=t)
    tidal = TidalDecode(token_budget=k.shape[1])
    idx = tidal.select(q, k)
    assert torch.equal(idx, torch.arange(k.shape[1]).expand(q.shape[0], -1))
    assert torch.equal(tidal.attend(q, k, v, idx), tidal.attend(q, k, v, None))
    assert torch.allclose(tidal.attend(q, k, v, idx), sdpa(q, k, v), atol=1e-5)


def test_tidal_selects_each_heads_top_attention_and_attends_only_there():
    q, k, v = data(t=2)
    tidal = TidalDecode(token_budget=5)
    idx = tidal.select(q, k)
    groups = q.shape[0] // k.shape[0]
    for h in range(q.shape[0]):
        w = [sum(math.exp(float(q[h, s] @ k[h // groups, j]) / 4) /
                 sum(math.exp(float(q[h, s] @ k[h // groups, m]) / 4) for m in range(k.shape[1])) for s in range(2))
             for j in range(k.shape[1])]
        assert idx[h].tolist() == sorted(sorted(range(len(w)), key=lambda j: -w[j])[:5])
    mask = torch.zeros(q.shape[0], 1, k.shape[1], dtype=torch.bool)
    mask.scatter_(2, idx[:, None], True)
    assert torch.allclose(tidal.attend(q, k, v, idx), sdpa(q, k, v, mask), atol=1e-5)


def test_tidal_layer_roles():
    tidal = TidalDecode(dense_layers=2, selection_layers=(2, 13))
    assert [tidal.role(i) for i in (0, 1, 2, 3, 12, 13, 14)] == ["dense", "dense", "select", "sparse", "sparse",
                                                                  "select", "sparse"]
    with pytest.raises(ValueError, match="selection layer"):
        TidalDecode(dense_layers=2, selection_layers=(5,))


# ---- Quest ----

def test_quest_bound_is_an_upper_bound_per_page():
    q, k, _ = data(t=1, n=37)
    quest = QuestPress(page_size=8)
    kmin, kmax = quest.page_metadata(k)
    assert kmin.shape == (2, 5, 16)  # 37 tokens: 4 full pages and a partial one
    bounds = quest.upper_bounds(q, kmin, kmax)
    groups = q.shape[0] // k.shape[0]
    for h in range(q.shape[0]):
        dots = k[h // groups] @ q[h, 0]
        for p in range(5):
            assert bounds[h, p] >= dots[p * 8:(p + 1) * 8].max() - 1e-5
    # A page of one key: the bound is that key's dot product exactly.
    single = QuestPress(page_size=1)
    assert torch.allclose(single.upper_bounds(q, *single.page_metadata(k)),
                          torch.einsum("hd,hnd->hn", q[:, 0], k.repeat_interleave(groups, 0)), atol=1e-5)


def test_quest_with_every_page_is_full_attention_exactly():
    q, k, v = data(t=1, n=37)
    quest = QuestPress(page_size=8, token_budget=40)
    pages = quest.select(q, k)
    assert torch.equal(pages, torch.arange(5).expand(q.shape[0], -1))
    assert torch.equal(quest.attend(q, k, v, pages), attend(q, k, v))
    assert torch.allclose(quest.attend(q, k, v, pages), sdpa(q, k, v), atol=1e-5)


def test_quest_selects_top_bound_pages_and_attends_to_their_tokens():
    q, k, v = data(t=1, n=37, seed=1)
    quest = QuestPress(page_size=8, token_budget=16)
    pages = quest.select(q, k)
    bounds = quest.upper_bounds(q, *quest.page_metadata(k))
    assert pages.shape == (6, 2)
    for h in range(6):
        assert set(pages[h].tolist()) == set(bounds[h].topk(2).indices.tolist())
    mask = torch.zeros(6, 1, 37, dtype=torch.bool)
    for h in range(6):
        for p in pages[h].tolist():
            mask[h, 0, p * 8:(p + 1) * 8] = True
    assert torch.allclose(quest.attend(q, k, v, pages), sdpa(q, k, v, mask), atol=1e-5)
