"""Sliding-window layers on rings (models/kv_cache.py): a Gemma-3-shaped model whose window layers keep only
window + ring_pass entries per sequence gives the same tokens (and nearly the same logits) as the full allocation,
for prompts many windows long, through every path that writes, moves or copies KV entries: plain and fused greedy
decoding, static (graph) passes, draft trees with accepted paths compacted, beam forks, n samples forked from one
prefill, an eviction press, a compressed self-speculation cache, the decode kernel's window bounds; and the bytes a
sequence holds in the window layers stay at the ring's capacity however long it grows."""
import math

import pytest
import torch

import decodekit
from decodekit.engine import Engine
from decodekit.kv.paged.state import RowObserver
from decodekit.models.kv_cache import SeqKV
from drafter_options import drafter_options
from engine_helpers import ExactPress  # noqa: F401 (registers press "test_exact")
from kernel_reference import use_references

WINDOW = 8  # tiny-gemma3: layers 0-2 slide over 8 positions, layer 3 is global
RING_PASS = 16
BLOCK = 4
CAPACITY = 40  # window + 2 ring_pass, in whole blocks of 4 (models/transformer.ring_capacity)
SPAN = 24  # what a pass reads of it: capacity - ring_pass


@pytest.fixture(scope="module")
def pair():
    """(ring, full): two engines over one float32 model."""
    full = decodekit.load("random:tiny-gemma3", device="cpu", dtype="float32", window_ring=False, block_size=BLOCK)
    ring = Engine(full.model, full.tokenizer, block_size=BLOCK, ring_pass=RING_PASS)
    assert [(r.capacity, r.span) for r in ring.core.pool.rings] == [(CAPACITY, SPAN)] and not full.core.pool.rings
    return ring, full


def prompt(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, 500, (11,), generator=g).tolist()  # repeats: drafters find matches
    return (motif * 3 + torch.randint(3, 500, (n,), generator=g).tolist())[:n]


PROMPTS = [prompt(90), prompt(61, 1), prompt(130, 2)]  # 7 to 16 windows long; the ring wraps several times


def same(ring, full, prompts=PROMPTS, n=40, **kw):
    a = ring.generate(prompts, n, ignore_eos=True, **kw)
    b = full.generate(prompts, n, ignore_eos=True, **kw)
    flat = lambda rs: [r for x in rs for r in (x if isinstance(x, list) else [x])]  # noqa: E731
    a, b = flat(a), flat(b)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    return a, b


def test_greedy_tokens_and_logits_match_the_full_allocation(pair):
    ring, full = pair
    a, b = same(ring, full, logprobs=5)
    for x, y in zip(a, b):
        lx = torch.tensor([lp for lp, _ in x.logprobs])
        ly = torch.tensor([lp for lp, _ in y.logprobs])
        assert torch.allclose(lx, ly, atol=1e-4)
        tx = torch.tensor([[v for _, v in top] for _, top in x.logprobs])
        ty = torch.tensor([[v for _, v in top] for _, top in y.logprobs])
        assert torch.allclose(tx, ty, atol=1e-4)


def test_a_single_pass_reads_exactly_what_the_full_pool_gives(pair):
    """One sequence fed through forward_seq, chunk by chunk, then a token tree: all logits equal."""
    ring, full = pair
    model, p = ring.model, prompt(100, 3)
    got, want = [], []
    for engine, out in ((ring, got), (full, want)):
        kv = SeqKV(engine.core.pool)
        for s in range(0, 96, 16):
            out.append(model.forward_seq(kv, p[s:s + 16], list(range(s, s + 16))))
        tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool)
        out.append(model.forward_seq(kv, p[96:100], [96, 97, 97, 98], tree))
        kv.keep_path(kv.length - 4, [0, 2])
        out.append(model.forward_seq(kv, [7], [98]))
        kv.free()
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-5)


def test_window_layers_hold_at_most_the_ring(pair):
    """A sequence of 300 tokens (37 windows): the ring storage holds CAPACITY entries of it, read from the pool's
    allocators; the stats count them (full layer: every entry; window layers: the ring)."""
    ring, full = pair
    p = prompt(240, 4)
    req = ring.add_request(p, 60, ignore_eos=True)
    pool = ring.core.pool
    rings_free = pool.rings[0].allocator.num_free
    peak = 0
    while not req.finished:
        ring.step()
        if not req.finished:
            held = rings_free - pool.rings[0].allocator.num_free
            assert held == len(req.sequences[0].kv.rings[0])
            peak = max(peak, held)
    assert peak == CAPACITY // BLOCK  # it grew to the ring and stopped there
    assert pool.rings[0].allocator.num_free == rings_free  # given back
    got = req.sequences[0].result().stats
    slot = 2 * 2 * 16 * 4  # keys and values, 2 KV heads x 16 dims, float32, one layer
    written = 240 + 59
    assert got.kv_bytes_final == math.ceil(written / BLOCK) * BLOCK * slot * 1 + CAPACITY * slot * 3
    plain = full.generate(p, 60, ignore_eos=True).stats
    assert plain.kv_bytes_final == math.ceil(written / BLOCK) * BLOCK * slot * 4
    assert got.kv_bytes_uncompressed == got.kv_bytes_final


def test_prefill_chunks_are_not_cut_to_the_ring(pair):
    """A prompt wider than the ring prefills in one pass (its ring layers read through: `_ring_view`)."""
    ring, full = pair
    p = prompt(100, 5)
    req = ring.add_request(p, 2, ignore_eos=True)
    while not req.finished:
        ring.step()
    assert req.sequences[0].stats.forward_passes == 2
    assert req.sequences[0].result().token_ids == full.generate(p, 2, ignore_eos=True).token_ids


@pytest.mark.parametrize("chunk", [20, 40, 60, 97])  # past max_pass (16); the ring's capacity (40); wrapping it
def test_passes_wider_than_the_ring_read_what_the_full_pool_gives(pair, chunk):
    """Prefill chunks wider than the ring, then narrow passes that read what the wide ones left in the ring: every
    logit equals the full allocation's."""
    ring, full = pair
    model, p = ring.model, prompt(200, 6)
    got, want = [], []
    for engine, out in ((ring, got), (full, want)):
        kv = SeqKV(engine.core.pool)
        for s in range(0, 194, chunk):
            e = min(s + chunk, 194)
            out.append(model.forward_seq(kv, p[s:e], list(range(s, e))))
        for t in range(194, 200):
            out.append(model.forward_seq(kv, p[t:t + 1], [t]))
        kv.free()
    for x, y in zip(got, want):
        assert torch.allclose(x, y, atol=1e-5)


def test_fused_greedy_chunks_and_static_passes(pair):
    """Fused greedy chunks (eager reference) and the static-buffer passes of the graph runner (on the CPU its
    "replay" calls the captured function) over rings."""
    ring, full = pair
    fused = Engine(ring.model, ring.tokenizer, block_size=BLOCK, ring_pass=RING_PASS)
    fused.core.runner.fused_sizes = (16, 4)
    same(fused, full, n=45)
    graphed = Engine(ring.model, ring.tokenizer, block_size=BLOCK, ring_pass=RING_PASS, cuda_graphs=True)
    same(graphed, full, n=45)
    same(graphed, full, n=30, method="aded", method_options={"max_nodes": 12})
    assert any(k[3] == 16 for k in graphed.core.runner.passes)


@pytest.mark.parametrize("method,options", [
    ("pld", {}),
    ("aded", {"max_nodes": 12}),
    ("draft", {"tree_width": 3, "max_nodes": 12, "num_draft": 4}),  # the target drafts: long accepted tree paths
    ("eagle", {"max_nodes": 12}),  # an untrained head on its features
])
def test_draft_trees_and_compacted_paths(pair, method, options):
    ring, full = pair
    opts = {**drafter_options(method, ring), **options}
    a, _ = same(ring, full, method=method, method_options=opts, adaptive=False)  # every step drafts
    if method == "draft":
        assert sum(r.stats.tau for r in a) / len(a) > 2  # accepted paths were moved into place


def test_beam_search_forks_rings(pair):
    ring, full = pair
    a = ring.generate(PROMPTS[:2], 24, ignore_eos=True, search="beam", search_options={"num_beams": 3},
                      return_all=True)
    b = full.generate(PROMPTS[:2], 24, ignore_eos=True, search="beam", search_options={"num_beams": 3},
                      return_all=True)
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.candidates] == [c.token_ids for c in y.candidates]
        assert [c.stats.score for c in x.candidates] == pytest.approx([c.stats.score for c in y.candidates],
                                                                      abs=1e-4)


def test_n_samples_share_one_prefill(pair):
    ring, full = pair
    a = ring.generate(PROMPTS[0], 30, ignore_eos=True, n=3, temperature=0.8, seed=7)
    b = full.generate(PROMPTS[0], 30, ignore_eos=True, n=3, temperature=0.8, seed=7)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert len({tuple(r.token_ids) for r in a}) == 3
    assert sum(r.stats.forward_passes for r in a) < 3 * 30 + 3 * math.ceil(90 / RING_PASS)  # forked: one prefill


@pytest.mark.parametrize("press,options", [("streaming_llm", {}), ("snapkv", {"window_size": 8})])
def test_eviction_compacts_the_rings_too(pair, press, options):
    ring, full = pair
    a, _ = same(ring, full, press=press, compression_ratio=0.6, press_options=options)
    assert all(r.stats.kv_bytes_final < r.stats.kv_bytes_uncompressed for r in a)


@pytest.mark.parametrize("press,options", [("test_exact", {}),
                                            ("snapkv+test_exact", {"compression_ratio": 0.5, "window_size": 8})])
def test_quantized_press_packs_the_rings_too(pair, press, options):
    """A quantizing press packs the window layers' entries as they age, from the first one inside the window, as it
    packs the global layer's; packs that left the window are dropped and the ring blocks of what is packed go back.
    With a lossless "quantizer" (residual 4 < window 8: packed entries are still read) the tokens are the full
    allocation's: the packed entries are read back at their ring columns, the ones gone masked."""
    ring, full = pair
    req = ring.add_request(PROMPTS[2], 40, ignore_eos=True, press=press, residual=4, **options)
    most, chunks_read = 0, 0
    while not req.finished:
        ring.step()
        seq = req.sequences[0]
        if not req.finished and seq.press.observed(seq.kv):
            state = getattr(seq.press, "quant", seq.press)
            held = [b for b in seq.kv.rings[0] if b]
            most = max(most, len(held))
            chunks_read += len(state.ring_chunks[0])
            assert state.ring_packed[0] >= seq.kv.length - 4 - 4 - 1  # at most residual + a chunk + this step
    assert most <= 4 and chunks_read > 0  # residual + chunk + a step's entry, in blocks of 4 (of the ring's 10)
    want = full.generate(PROMPTS[2], 40, ignore_eos=True, press=press, residual=4, **options)
    assert req.sequences[0].output == want.token_ids
    assert all(r.allocator.num_free == r.allocator.capacity for r in ring.core.pool.rings)


def test_kivi_holds_fewer_ring_bytes(pair):
    """KIVI 2-bit over rings: the window layers' entries past the recent window are held packed, so a sequence holds
    far less than its rings' capacity in them."""
    ring, _ = pair
    r = ring.generate(prompt(120, 6), 30, ignore_eos=True, press="kivi", residual=16, group=16)
    assert len(r.token_ids) == 30
    slot = 2 * 2 * 16 * 4  # keys and values, 2 KV heads of 16 channels, float32: one entry of one layer
    assert r.stats.kv_bytes_final < CAPACITY * slot * 3 < r.stats.kv_bytes_uncompressed


def test_kivi_packs_a_rings_layers_together_exactly(pair):
    """KIVI packs each head on its own, so a ring chunk packs all the ring's layers at once, stacked as heads: every
    layer reads back what a pack of its own gives, and the two sequences hold the same bytes and make the same
    tokens."""
    from decodekit.kv.paged.quantized import STACKED

    ring, _ = pair
    reqs = [ring.add_request(PROMPTS[2], 30, ignore_eos=True, press="kivi", residual=4, group=4) for _ in range(2)]
    states = [r.sequences[0].press for r in reqs]
    states[1].press.heads_apart = False  # this one: a pack per layer
    compared = 0
    while not all(r.finished for r in reqs):
        ring.step()
        if any(r.finished for r in reqs):
            continue
        together, apart = (s.ring_chunks.get(0, []) for s in states)
        assert [c[0] for c in together] == [c[0] for c in apart]
        if not together:
            continue
        assert all(list(c[1]) == [STACKED] for c in together) and all(STACKED not in c[1] for c in apart)
        mine, theirs = RowObserver(states[0], 0, [0], False), RowObserver(states[1], 0, [0], False)
        for layer in states[0].ring_layers[0]:
            got, want = states[0]._ring_window(mine, 0, layer), states[1]._ring_window(theirs, 0, layer)
            assert got[0].shape[1] == len(together) * 4 and all(torch.equal(a, b) for a, b in zip(got, want))
            compared += 1
    assert compared > 0
    a, b = (r.sequences[0] for r in reqs)
    assert a.output == b.output and a.stats.kv_bytes_final == b.stats.kv_bytes_final


@pytest.mark.parametrize("method,options", [("magicdec", {"budget": 24, "n_sink": 4, "compress_every": 8}),
                                            ("quantspec", {"residual": 16, "group": 16})])
def test_compressed_self_speculation_over_rings(pair, method, options):
    """A self-speculation draft cache (a StreamingLLM or KIVI copy of the target's, in the target's pool): its own
    rings, built from the target's entries; lossless."""
    ring, full = pair
    a, _ = same(ring, full, prompts=PROMPTS[:2], n=30, method=method, method_options=options, adaptive=False)
    assert all(r.stats.tau > 1 for r in a)  # drafts were accepted


def test_decode_kernel_bounds_in_ring_columns(pair, monkeypatch):
    """The Triton kernel's path (on the CPU: its reference in torch) reads columns [lo, hi) of a ring's table: the
    window's first column from positions, after the ring wrapped and after eviction."""
    ring, full = pair
    want = full.generate(PROMPTS, 30, ignore_eos=True)
    evicted = full.generate(PROMPTS[0], 30, ignore_eos=True, press="streaming_llm", compression_ratio=0.6)
    with monkeypatch.context() as m:
        calls = use_references(m)
        got = ring.generate(PROMPTS, 30, ignore_eos=True)
        got_evicted = ring.generate(PROMPTS[0], 30, ignore_eos=True, press="streaming_llm", compression_ratio=0.6)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got_evicted.token_ids == evicted.token_ids
    assert ("decode", SPAN) in calls  # ring layers went through the kernel path, over their ring's columns
    assert any(name == "tree" for name, _ in calls)  # prefill chunks of the global layer: the tree kernel's path


def test_requests_a_ring_cannot_take_are_refused(pair):
    ring, _ = pair
    with pytest.raises(ValueError, match="ring"):
        ring.generate(PROMPTS[0], 10, method="aded", method_options={"max_nodes": 24})
    with pytest.raises(ValueError, match="tidal"):
        ring.generate(PROMPTS[0], 10, press="tidal", compression_ratio=0.5, selection_layers=(1,), dense_layers=1)
    with pytest.raises(ValueError, match="ring_pass"):
        Engine(ring.model, ring.tokenizer, ring_pass=8)


def test_ring_sequences_do_not_use_the_prefix_cache(pair):
    ring, full = pair
    p = PROMPTS[2]
    first = ring.generate(p, 5, ignore_eos=True)
    again = ring.generate(p, 5, ignore_eos=True)
    assert again.stats.cached_prompt_tokens == 0 and again.token_ids == first.token_ids
    full.generate(p, 5, ignore_eos=True)
    assert full.generate(p, 5, ignore_eos=True).stats.cached_prompt_tokens > 0


def test_preemption_gives_rings_back(pair):
    """A pool with room for two rings: three sequences run by turns (preempted, prefilled again), same tokens."""
    ring, full = pair
    small = Engine(ring.model, ring.tokenizer, block_size=BLOCK, ring_pass=RING_PASS, max_running=2)
    assert small.core.pool.rings[0].allocator.capacity == 2 * CAPACITY // BLOCK
    a = small.generate(PROMPTS, 30, ignore_eos=True)
    b = full.generate(PROMPTS, 30, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert small.core.pool.rings[0].allocator.num_free == small.core.pool.rings[0].allocator.capacity


def test_forks_share_ring_blocks_until_they_write(pair):
    """A fork takes no ring block; the first write into a shared block gives the writer a copy of its own (the
    other sequence's entries unchanged), and freeing both returns every block."""
    ring, _ = pair
    pool = ring.core.pool
    alloc = pool.rings[0].allocator
    free0 = alloc.num_free
    parent = SeqKV(pool)
    parent.ensure(CAPACITY + 6)  # the ring has wrapped: every one of its blocks held
    n = CAPACITY // BLOCK
    parent.length = CAPACITY + 6
    held = parent.ring_slots(0, range(6, CAPACITY + 6))
    # The parent's entries, as its passes would have written them (the pool is allocated uninitialized: a NaN there
    # would never compare equal to itself)
    pool.rings[0].k[:, held] = torch.randn(pool.rings[0].k[:, held].shape, generator=torch.Generator().manual_seed(0))
    before = pool.rings[0].k[:, held].clone()
    child = parent.fork()
    assert child.rings[0] == parent.rings[0] and alloc.num_free == free0 - n  # shared, none taken
    assert all(alloc.refs[b] == 2 for b in parent.rings[0])
    child.ensure(CAPACITY + 6 + 2)  # the next 2 entries, 46 and 47: one block, (46 // 4) % 10 = 1
    changed = [i for i in range(n) if child.rings[0][i] != parent.rings[0][i]]
    assert changed == [(CAPACITY + 6) // BLOCK % n] and alloc.num_free == free0 - n - 1
    slots = child.ring_slots(0, range(CAPACITY + 6, CAPACITY + 8))
    pool.rings[0].k[:, slots] = 7.0  # the child writes its new entries (over its copies of entries 6 and 7)
    assert torch.equal(pool.rings[0].k[:, held], before)
    assert torch.equal(pool.rings[0].k[:, child.ring_slots(0, range(8, CAPACITY + 6))], before[:, 2:])
    child.length = CAPACITY + 8
    assert child.fits(CAPACITY + 8 + 2)  # block 2 still shared: its copy is counted
    assert len(child._shared_ring_blocks(0, range(CAPACITY + 8, CAPACITY + 10))) == 1
    child.free()
    parent.free()
    assert alloc.num_free == free0


def test_best_first_beam_over_shared_rings(pair):
    """Best-first beam keeps every open hypothesis as a forked sequence: over rings, it finds what it finds with the
    full allocation, and leaves no ring block behind."""
    ring, full = pair
    options = {"search": "best_first_beam", "search_options": {"num_beams": 3}, "ignore_eos": True}
    a = ring.generate(PROMPTS[:2], 16, **options)
    b = full.generate(PROMPTS[:2], 16, **options)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert [r.stats.score for r in a] == pytest.approx([r.stats.score for r in b], abs=1e-4)
    alloc = ring.core.pool.rings[0].allocator
    assert alloc.num_free == alloc.capacity
