import math

import pytest
import torch

from decodekit.kv import PRESSES, LayerKV, ScorerPress, make_press, reduce_headwise
from decodekit.kv.base import kept_count

from kv_helpers import layer


@pytest.mark.parametrize("length,ratio", [(10, 0.0), (10, 0.3), (10, 0.7), (100, 0.29), (7, 0.5), (3, 0.99)])
def test_kept_count_is_floor_of_kept_fraction(length, ratio):
    expected = max(1, math.floor(round((1 - ratio) * length, 9)))
    assert kept_count(length, ratio) == expected


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5])
def test_bad_ratio_is_a_clear_error(ratio):
    with pytest.raises(ValueError, match="compression_ratio"):
        make_press("knorm", compression_ratio=ratio)


def test_registry_names_and_knob_errors():
    assert {"streaming_llm", "h2o", "snapkv", "knorm", "ems", "scope", "kivi", "kvquant", "gear", "rotatekv",
            "tidal", "quest"} <= set(PRESSES)
    with pytest.raises(ValueError, match="unknown press"):
        make_press("nope")
    with pytest.raises(ValueError, match="no knob 'window'"):
        make_press("knorm", window=3)
    assert make_press("streaming_llm", n_sink=2, compression_ratio=0.5).n_sink == 2


class Exploding(ScorerPress):
    """A scorer that must not be consulted when nothing is to be evicted."""

    def score(self, kv, n_keep):
        raise AssertionError("scored although nothing is evicted")


class NormScorer(ScorerPress):
    def score(self, kv, n_keep):
        return kv.keys.norm(dim=-1)


def test_ratio_zero_keeps_everything_without_scoring():
    kv = layer()
    press = Exploding(compression_ratio=0.0)
    assert torch.equal(press.select(kv), torch.arange(kv.length))
    out = press.compress(kv)
    assert torch.equal(out.keys, kv.keys) and torch.equal(out.values, kv.values)
    assert torch.equal(out.positions, kv.positions) and torch.equal(out.attn_mass, kv.attn_mass)


def test_base_turns_scores_into_sorted_kept_indices_with_positions():
    kv = layer(length=20)
    press = NormScorer(compression_ratio=0.6)
    idx = press.select(kv)
    n_keep = kept_count(20, 0.6)
    assert idx.tolist() == sorted(idx.tolist()) and len(idx) == n_keep == 8
    mean_score = kv.keys.norm(dim=-1).mean(dim=0)
    assert set(idx.tolist()) == set(mean_score.topk(n_keep).indices.tolist())
    out = press.compress(kv)
    assert torch.equal(out.positions, kv.positions[idx])
    assert torch.equal(out.keys, kv.keys[:, idx]) and torch.equal(out.attn_mass, kv.attn_mass[:, idx])
    headwise = press.select_headwise(kv)
    for h in range(kv.keys.shape[0]):
        assert set(headwise[h].tolist()) == set(kv.keys[h].norm(dim=-1).topk(n_keep).indices.tolist())
        assert headwise[h].tolist() == sorted(headwise[h].tolist())


def test_reduce_headwise_votes_then_scores():
    scores = torch.tensor([[5.0, 4, 3, 2, 1], [1.0, 4, 5, 2, 3]])
    chosen = torch.tensor([[0, 1], [1, 2]])  # token 1 is kept by both heads, 0 and 2 by one each
    # Token 1 wins on votes; 0 (total 6) loses to 2 (total 8) on the tie-break.
    assert reduce_headwise(chosen, scores, 2).tolist() == [1, 2]
    assert reduce_headwise(chosen, scores, 3).tolist() == [0, 1, 2]


def test_layerkv_shape_errors():
    k = torch.zeros(2, 5, 4)
    with pytest.raises(ValueError, match="positions"):
        LayerKV(k, k, torch.arange(4))
    with pytest.raises(ValueError, match="queries"):
        LayerKV(k, k, torch.arange(5), queries=torch.zeros(3, 2, 4))
    with pytest.raises(ValueError, match="attn_mass"):
        LayerKV(k, k, torch.arange(5), attn_mass=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="needs attn_mass"):
        make_press("h2o", compression_ratio=0.5).select(LayerKV(k, k, torch.arange(5)))


def test_gather_keeps_window_queries_only_while_the_window_is_intact():
    kv = layer(length=10, window=3)
    assert kv.gather(torch.tensor([0, 4, 7, 8, 9])).queries is kv.queries
    assert kv.gather(torch.tensor([0, 4, 7, 9])).queries is None  # token 8 of the window is gone
    assert kv.gather(torch.tensor([8, 9])).queries is None
