"""The mechanism under presses in the paged cache, on small tensors: compaction, blocks handed out of the pool, one
token set over layers, the attention mass H2O accumulates, the window bounds of the decode kernel."""
import math

import pytest
import torch

from decodekit.kv import H2OPress, KnormPress, LayerKV, SnapKVPress, StreamingLLMPress
from decodekit.kv.paged.eviction import EvictionState, select_shared
from decodekit.models.kv_cache import KVPool, SeqKV
from decodekit.models.config import shape
from decodekit.models.transformer import Transformer, window_lo

from kv_helpers import layer


def filled(pool: KVPool, n: int) -> SeqKV:
    """A sequence of `n` entries whose keys, values and positions say which token they hold."""
    kv = SeqKV(pool)
    kv.ensure(n)
    slots = torch.tensor(kv.slots(0, n))
    pool.k[:, slots] = torch.arange(n, dtype=torch.float32)[None, :, None, None]
    pool.v[:, slots] = -torch.arange(n, dtype=torch.float32)[None, :, None, None]
    pool.slot_pos[slots] = torch.arange(n)
    kv.length = n
    return kv


def tokens_held(kv: SeqKV) -> list[int]:
    slots = torch.tensor(kv.slots(0, kv.length), dtype=torch.long)
    held = kv.pool.k[0, slots, 0, 0].long().tolist()
    assert kv.pool.slot_pos[slots].tolist() == held  # each entry keeps its own position
    assert (-kv.pool.v[1, slots, 0, 0]).long().tolist() == held
    return held


def test_compact_keeps_entries_and_positions_and_frees_blocks():
    pool = KVPool(2, 12, 4, 1, 2, torch.float32, "cpu")
    kv = filled(pool, 22)  # 6 blocks
    free = pool.allocator.num_free
    keep = [0, 1, 5, 9, 10, 17, 21]
    kv.compact(keep)
    assert tokens_held(kv) == keep
    assert kv.length == 7 and kv.evicted == 15 and kv.written == 22 and not kv.dense
    assert len(kv.blocks) == 2 and pool.allocator.num_free == free + 4


def test_compact_copies_on_write_where_blocks_are_shared():
    pool = KVPool(2, 16, 4, 1, 2, torch.float32, "cpu")
    parent = filled(pool, 10)
    child = parent.fork()  # shares the two full blocks
    shared = list(child.blocks[:2])
    child.compact([2, 3, 6, 7, 9])
    assert tokens_held(child) == [2, 3, 6, 7, 9]
    assert tokens_held(parent) == list(range(10))  # untouched
    assert not set(child.blocks) & set(shared)
    child.free()
    parent.free()
    assert pool.allocator.num_free == pool.allocator.capacity


def test_hand_over_moves_leading_blocks_out_of_the_pool():
    pool = KVPool(1, 10, 4, 1, 2, torch.float32, "cpu")
    kv = filled(pool, 13)
    free = pool.allocator.num_free
    kv.hand_over(2)
    assert kv.virtual == 2 and pool.allocator.num_free == free + 2 and kv.length == 13
    assert kv.table()[:2] == [0, 0]  # read as scratch
    assert tokens_held_from(kv, 8) == [8, 9, 10, 11, 12]
    with pytest.raises(ValueError):
        kv.slots(4, 1)
    kv.ensure(20)
    assert kv.capacity == 20 and len(kv.blocks) == 3
    kv.free()
    assert pool.allocator.num_free == pool.allocator.capacity and kv.virtual == 0


def tokens_held_from(kv: SeqKV, start: int) -> list[int]:
    slots = torch.tensor(kv.slots(start, kv.length - start))
    return kv.pool.k[0, slots, 0, 0].long().tolist()


@pytest.mark.parametrize("press", [StreamingLLMPress(), KnormPress(), SnapKVPress(kernel_size=3), H2OPress()],
                         ids=lambda p: p.name)
def test_one_scoring_layer_selects_what_the_press_selects(press):
    kv = layer(length=20, window=4)
    for n_keep in (1, 5, 13, 20):
        assert select_shared([kv], press, n_keep).tolist() == press.select(kv, n_keep).tolist()


def test_several_layers_vote_by_mean_rank():
    a, b = layer(length=9, seed=1), layer(length=9, seed=2)
    press = KnormPress()
    ranks = []
    for kv in (a, b):
        s = press.score(kv, 4).double().mean(0).tolist()
        order = sorted(range(9), key=lambda i: s[i])
        ranks.append({i: r for r, i in enumerate(order)})
    mean = [(ranks[0][i] + ranks[1][i]) / 2 for i in range(9)]
    want = sorted(sorted(range(9), key=lambda i: -mean[i])[:4])
    assert select_shared([a, b], press, 4).tolist() == want


def softmax_by_hand(q, keys, visible, scale):
    """Attention of one query head `q` [D] over keys [L, D] where visible."""
    logits = [float(q @ k) * scale if visible[j] else -math.inf for j, k in enumerate(keys)]
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    return [x / sum(e) for x in e]


def test_h2o_mass_is_the_attention_of_committed_queries():
    """A prefill row of 5 tokens, then a decode row of root + a 2-token draft of which only the root and node 2
    (a sibling of node 1) are kept: the mass each entry holds is the summed attention of the committed queries."""
    config = shape("tiny-llama")  # 4 query heads, 2 KV heads
    model = Transformer(config)
    state = EvictionState(H2OPress(), model, prompt_len=5, ratio=0.5, every=0)
    g = torch.Generator().manual_seed(0)
    h, hkv, d, scale = 4, 2, 16, 0.25
    keys = torch.randn(hkv, 8, d, generator=g)
    q1 = torch.randn(h, 5, d, generator=g)
    causal = torch.ones(5, 8, dtype=torch.bool).tril()[None]
    obs = state.observer(SeqKVStub(0), list(range(5)), True)
    for layer in state.track:
        obs.attend(layer, q1, keys, keys, causal, scale)
    # Decode: root at entry 5, nodes 1 and 2 both children of the root (entries 6, 7).
    q2 = torch.randn(h, 3, d, generator=g)
    tree = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    mask = torch.cat([torch.ones(3, 5, dtype=torch.bool), tree], dim=1)[None]
    obs2 = state.observer(SeqKVStub(5), [5, 6, 6], False)
    for layer in state.track:
        obs2.attend(layer, q2, keys, keys, mask, scale)
    obs2.kept([0, 2])  # root and node 2: node 2 moves to entry 6
    want = torch.zeros(hkv, 7, dtype=torch.float64)
    for head in range(h):
        kh = head // 2
        for i in range(5):
            w = softmax_by_hand(q1[head, i], keys[kh], [j <= i for j in range(8)], scale)
            for j in range(5):
                want[kh, j] += w[j]
        for row in (0, 2):
            w = softmax_by_hand(q2[head, row], keys[kh], mask[0, row].tolist(), scale)
            for j in range(5):
                want[kh, j] += w[j]
            want[kh, 5] += w[5]
            want[kh, 6] += w[7]  # node 2's entry, now entry 6
    for t in range(len(state.track)):
        assert torch.allclose(state.mass[t, :, :7].double(), want, atol=1e-5)


class SeqKVStub:
    def __init__(self, length: int) -> None:
        self.length = length


def test_window_bounds_from_positions():
    # Dense: entry = position, so the window's first entry is ctx + 1 - window.
    ctx = torch.tensor([0, 3, 10, 20])
    pos = torch.arange(24).expand(4, -1)
    assert window_lo(pos, ctx, ctx, 8).tolist() == (ctx + 1 - 8).clamp_min(0).tolist()
    # After eviction: positions 0 1 2 3 | 30 31 ... (a StreamingLLM cache); the query is at position 40.
    pos = torch.tensor([[0, 1, 2, 3] + list(range(30, 40)) + [0] * 6])
    lo = window_lo(pos, torch.tensor([40]), torch.tensor([14]), 8)
    assert lo.tolist() == [4 + 3]  # positions 30, 31, 32 are at or before 40 - 8
    # A verify pass's queries at positions 40, 41, 42: each its own first entry.
    assert window_lo(pos, torch.tensor([[40, 41, 42]]), torch.tensor([14]), 8).tolist() == [[7, 8, 9]]
