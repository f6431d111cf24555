"""KV presses through the batched core: ratio 0 changes nothing, evicted blocks return to the pool and kept tokens
keep their positions, decoding after eviction is attention over exactly the kept tokens (also through the decode
kernel's window bounds), quantized blocks leave the pool and are read back, bytes held are reported, presses
compose with drafts, samples and preemption."""
import math

import pytest
import torch

import decodekit
from decodekit.kv import PRESSES
from decodekit.kv.base import kept_count
from decodekit.kv.paged.state import PressState, RowObserver
from engine_helpers import ExactPress, fused_engine  # noqa: F401 (registers press "test_exact")
from kernel_reference import use_references

EVICTION = ["streaming_llm", "h2o", "snapkv", "knorm", "ems", "scope"]
SPARSE = ["tidal", "quest"]
QUANT = ["kivi", "kvquant", "gear", "rotatekv"]
SPARSE_KNOBS = {"tidal": {"selection_layers": (1,), "dense_layers": 1}, "quest": {"dense_layers": 1, "page_size": 4}}


@pytest.fixture(scope="module")
def llama():
    return decodekit.load("random:tiny-llama", device="cpu")


@pytest.fixture(scope="module")
def gemma():
    # Sliding window 8 on 3 of 4 layers, every entry kept in every layer (no ring): these tests pin what the presses
    # do in window layers too (quantized, selected); tests/engine/test_window_ring.py runs presses over rings.
    return decodekit.load("random:tiny-gemma3", device="cpu", window_ring=False)


def prompt(n: int = 90, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, 500, (9,), generator=g).tolist()
    return (motif * 4 + torch.randint(3, 500, (n,), generator=g).tolist())[:n]


def small(name: str) -> dict:
    """Knobs that make a press act inside a short test (small windows, budgets, chunks)."""
    return {"snapkv": {"window_size": 8}, "ems": {"window_size": 8}, "scope": {"decode_budget": 6},
            "kivi": {"residual": 16, "group": 16}, **{q: {"residual": 16} for q in QUANT if q != "kivi"},
            "gear": {"residual": 16, "chunk": 64},
            **SPARSE_KNOBS}.get(name, {})


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_ratio_zero_changes_nothing(which, request):
    engine = request.getfixturevalue(which)
    p = prompt()
    plain = engine.generate(p, 24, ignore_eos=True)
    for name in EVICTION + SPARSE:
        knobs = {k: v for k, v in small(name).items() if k not in ("decode_budget",)}
        got = engine.generate(p, 24, ignore_eos=True, press=name, compression_ratio=0.0, press_options=knobs)
        assert got.token_ids == plain.token_ids, name
        assert got.stats.kv_bytes_final == plain.stats.kv_bytes_final, name


def test_stats_without_a_press_hold_what_is_written(llama):
    r = llama.generate(prompt(50), 20, ignore_eos=True)
    s = r.stats
    per_token = llama.core.pool.bytes_per_token()
    assert s.kv_bytes_final == s.kv_bytes_peak == s.kv_bytes_uncompressed == math.ceil(69 / 16) * 16 * per_token


@pytest.mark.parametrize("name", EVICTION)
def test_eviction_frees_blocks_and_keeps_positions(name, gemma):
    engine = gemma
    pool, alloc = engine.core.pool, engine.core.pool.allocator
    p = prompt(90)
    req = engine.add_request(p, 12, ignore_eos=True, press=name, compression_ratio=0.75,
                             press_options={**small(name), "compress_every": 0})
    engine.step()  # the whole prompt in one pass, its first token, then the press
    seq = req.sequences[0]
    kv = seq.kv
    n_keep = kept_count(90, 0.75)  # (scope: its prompt budget, from R)
    assert kv.length == n_keep and kv.written == 90 and kv.evicted == 90 - n_keep
    assert len(kv.blocks) == math.ceil(n_keep / 16)
    assert alloc.num_free == alloc.capacity - len(kv.blocks)
    positions = pool.slot_pos[torch.tensor(kv.slots(0, kv.length))].tolist()
    assert positions == sorted(positions) and len(set(positions)) == n_keep and max(positions) < 90
    if name == "streaming_llm":
        assert positions == [0, 1, 2, 3] + list(range(90 - (n_keep - 4), 90))
    if name == "snapkv":
        assert positions[-8:] == list(range(82, 90))  # the observation window is kept
    while not req.finished:
        engine.step()
    assert alloc.num_free == alloc.capacity
    s = seq.result().stats
    assert s.kv_bytes_peak == math.ceil(90 / 16) * 16 * pool.bytes_per_token()  # the prompt before pressing
    assert s.kv_bytes_final < s.kv_bytes_uncompressed


class HideEvicted(PressState):
    """Reference: no eviction at all; decode passes simply do not see the positions a press would evict."""

    def __init__(self, model, hidden: set[int]) -> None:
        super().__init__(None, model, 0)
        self.hidden = hidden
        self.pool = None

    def observed(self, kv):
        return True

    def observer(self, kv, positions, prefill):
        self.pool = kv
        return None if prefill else RowObserver(self, kv.length, positions, prefill)

    def attend(self, obs, layer, q, keys, values, mask, scale):
        slots = torch.tensor(self.pool.slots(0, obs.ctx))
        pos = self.pool.pool.slot_pos[slots]
        hide = torch.zeros(mask.shape[-1], dtype=torch.bool)
        hide[:obs.ctx] = torch.tensor([int(p) in self.hidden for p in pos])
        return keys, values, mask & ~hide


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_decoding_after_eviction_attends_over_exactly_the_kept_tokens(which, request, monkeypatch):
    engine = request.getfixturevalue(which)
    p = prompt(90)
    n_keep = kept_count(90, 0.75)
    got = engine.generate(p, 20, ignore_eos=True, press="streaming_llm", compression_ratio=0.75, compress_every=0)
    hidden = set(range(4, 90 - (n_keep - 4)))  # StreamingLLM evicts the middle of the prompt
    req = engine.make_request(p, 20, ignore_eos=True)
    engine.core.add(req)
    req.sequences[0].press = HideEvicted(engine.model, hidden)
    while not req.finished:
        engine.step()
    assert req.sequences[0].output == got.token_ids


def test_decode_kernel_window_follows_positions_after_eviction(gemma, monkeypatch):
    """The Triton kernel's path (on the CPU: its reference in torch) reads entries [lo, ctx] of a row; with evicted
    entries lo comes from positions. Same tokens as the masked path."""
    p = prompt(90)
    for ratio in (0.0, 0.75):
        want = gemma.generate(p, 20, ignore_eos=True, press="streaming_llm", compression_ratio=ratio)
        with monkeypatch.context() as m:
            calls = use_references(m)
            got = gemma.generate(p, 20, ignore_eos=True, press="streaming_llm", compression_ratio=ratio)
        assert got.token_ids == want.token_ids
        assert any(name == "decode" for name, _ in calls)


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_packed_blocks_leave_the_pool_and_are_read_back_exactly(which, request):
    engine = request.getfixturevalue(which)
    p = prompt(90)
    plain = engine.generate(p, 40, ignore_eos=True)
    alloc = engine.core.pool.allocator
    req = engine.add_request(p, 40, ignore_eos=True, press="test_exact", residual=16)
    while not req.finished:
        engine.step()
        kv = req.sequences[0].kv
        if not req.finished:
            assert kv.length - kv.virtual * 16 < 16 + 16 + 16  # at most residual + a chunk + this step
            assert alloc.num_free == alloc.capacity - len(kv.blocks)
    assert req.sequences[0].output == plain.token_ids
    assert alloc.num_free == alloc.capacity


def test_quantized_bytes_drop_by_the_ratio_the_format_claims(llama):
    """KIVI 2-bit, group 16, float32 cache: a packed element costs 2/8 byte of code plus 4 bytes of float16 scale
    and zero per 16 elements, for keys (per channel) and values (per token) alike: (0.25 + 0.25) / 4 = 1/8."""
    r = llama.generate(prompt(90), 40, ignore_eos=True, press="kivi", bits=2, group=16, residual=16)
    s = r.stats
    per_token = llama.core.pool.bytes_per_token()
    written = 90 + 39
    packed = (written - 16) // 16 * 16
    held_fp = math.ceil((written - packed) / 16) * 16 * per_token
    assert s.kv_bytes_final == held_fp + packed * per_token // 8
    assert s.kv_bytes_uncompressed == math.ceil(written / 16) * 16 * per_token


def test_kivi_chunks_merge_without_changing_tokens_or_bytes(llama, monkeypatch):
    """KIVI's chunks of 16 entries merge as they accumulate (a binary counter): a few packs a layer to read instead
    of one per chunk, the same tokens and the same bytes as unmerged chunks."""
    from decodekit.kv.paged.quantized import QuantState

    def run():
        req = llama.add_request(prompt(90), 60, ignore_eos=True, press="kivi", bits=2, group=16, residual=16)
        while not req.finished:
            llama.step()
            seq = req.sequences[0]
            if not req.finished:
                counts.append(len(seq.press.chunks))
        return req.sequences[0]

    counts = []
    merged = run()
    # The prompt's 64 entries packed at once, then 4 chunks of 16: 64 + 16 + 16 + 16 + 16 merge into one.
    assert max(counts) <= 3 and merged.press.packed_len == 128 and counts[-1] == 1
    with monkeypatch.context() as m:
        m.setattr(QuantState, "_coalesce", lambda self: None)
        counts = []
        unmerged = run()
    assert counts[-1] == 5
    assert unmerged.output == merged.output and unmerged.stats.kv_bytes_final == merged.stats.kv_bytes_final
    for layer in range(llama.model.config.num_layers):  # what attention reads back: the same entries, in order
        assert all(torch.equal(a, b) for a, b in zip(merged.press.full_layer(layer), unmerged.press.full_layer(layer)))


@pytest.mark.parametrize("which", ["llama", "gemma"])
def test_eviction_then_quantization_packs_exactly_the_entries_eviction_kept(which, request):
    """snapkv+test_exact (a lossless "quantizer"): the same tokens as SnapKV alone, while the kept entries leave the
    pool chunk by chunk as they age."""
    engine = request.getfixturevalue(which)
    p = prompt(90)
    evicted = engine.generate(p, 40, ignore_eos=True, press="snapkv", compression_ratio=0.5, window_size=8)
    req = engine.add_request(p, 40, ignore_eos=True, press="snapkv+test_exact", compression_ratio=0.5,
                             window_size=8, residual=16)
    handed_over = 0
    while not req.finished:
        engine.step()
        handed_over = max(handed_over, req.sequences[0].kv.virtual)
    assert req.sequences[0].output == evicted.token_ids
    assert handed_over >= 2 and req.sequences[0].stats.press == "snapkv+test_exact"
    assert engine.core.pool.allocator.num_free == engine.core.pool.allocator.capacity


def test_eviction_then_quantization_holds_the_product_of_the_two(llama):
    """snapkv 50% then KIVI 2-bit (float32 cache: a packed entry costs 1/8): the entries SnapKV kept, packed as KIVI
    packs a sequence that was never evicted."""
    p = prompt(90)
    r = llama.generate(p, 40, ignore_eos=True, press="snapkv+kivi", compression_ratio=0.5, window_size=8, bits=2,
                       group=16, residual=16)
    per_token = llama.core.pool.bytes_per_token()
    held = kept_count(90, 0.5) + 39
    packed = (held - 16) // 16 * 16
    assert r.stats.kv_bytes_final == math.ceil((held - packed) / 16) * 16 * per_token + packed * per_token // 8
    alone = llama.generate(p, 40, ignore_eos=True, press="snapkv", compression_ratio=0.5, window_size=8)
    assert r.stats.kv_bytes_final < alone.stats.kv_bytes_final / 2
    # With R = 0 the eviction press keeps everything: the quantizer still packs, as KIVI alone does.
    kept_all = llama.generate(p, 40, ignore_eos=True, press="snapkv+kivi", window_size=8, bits=2, group=16,
                              residual=16)
    kivi = llama.generate(p, 40, ignore_eos=True, press="kivi", bits=2, group=16, residual=16)
    assert (kept_all.token_ids, kept_all.stats.kv_bytes_final) == (kivi.token_ids, kivi.stats.kv_bytes_final)
    assert kivi.stats.kv_bytes_final < kivi.stats.kv_bytes_uncompressed / 2
    samples = llama.generate(p, 12, ignore_eos=True, press="snapkv+kivi", compression_ratio=0.5, window_size=8,
                             residual=16, n=2, temperature=1.0, seed=0)  # forks: each sample its own packs
    assert [len(s.token_ids) for s in samples] == [12, 12]


def test_composed_press_arguments_are_checked(llama):
    r = llama.make_request("hi", press="snapkv+kivi", compression_ratio=0.75, kernel_size=3, residual=32, bits=4)
    evict, quant = r.press.parts
    assert (evict.name, evict.compression_ratio, evict.press_knobs) == ("snapkv", 0.75, {"kernel_size": 3})
    assert (quant.name, quant.compression_ratio, quant.residual, quant.press_knobs) == ("kivi", 0.0, 32, {"bits": 4,
                                                                                                         "residual": 32})
    with pytest.raises(ValueError, match="compose as EVICT\\+QUANT"):
        llama.make_request("hi", press="kivi+snapkv")
    with pytest.raises(ValueError, match="compose as EVICT\\+QUANT"):
        llama.make_request("hi", press="snapkv+knorm+kivi")
    with pytest.raises(ValueError, match="compress_every=0"):
        llama.make_request("hi", press="streaming_llm+kivi", compression_ratio=0.5)
    assert llama.make_request("hi", press="streaming_llm+kivi", compression_ratio=0.5, compress_every=0).press.parts
    with pytest.raises(ValueError, match="no knob|unknown knob"):
        llama.make_request("hi", press="snapkv+kivi", press_options={"nope": 1})


@pytest.mark.parametrize("name", QUANT)
def test_every_quantizer_runs_and_holds_fewer_bytes(name, gemma):
    r = gemma.generate(prompt(90), 30, ignore_eos=True, press=name, press_options=small(name))
    assert len(r.token_ids) == 30
    # GEAR's low-rank factors cost much next to a head of 16 channels; the others pack to 2 or 4 bits + scales.
    assert r.stats.kv_bytes_final < (0.9 if name == "gear" else 0.6) * r.stats.kv_bytes_uncompressed
    assert gemma.core.pool.allocator.num_free == gemma.core.pool.allocator.capacity


@pytest.mark.parametrize("name", SPARSE)
def test_sparse_attention_with_the_whole_budget_is_dense(name, gemma):
    p = prompt(60)
    plain = gemma.generate(p, 20, ignore_eos=True)
    got = gemma.generate(p, 20, ignore_eos=True, press=name, press_options={**SPARSE_KNOBS[name], "token_budget": 200})
    assert got.token_ids == plain.token_ids
    cut = gemma.generate(p, 20, ignore_eos=True, press=name, compression_ratio=0.9, press_options=SPARSE_KNOBS[name])
    assert len(cut.token_ids) == 20 and cut.stats.kv_bytes_final == plain.stats.kv_bytes_final  # nothing evicted


def test_sparse_mask_is_the_press_selection():
    """Quest in one layer: the entries a decode row may read are the selected pages (and its own tokens)."""
    from decodekit.kv import QuestPress
    from decodekit.kv.paged.sparse import SparseState
    from decodekit.models.config import shape
    from decodekit.models.transformer import Transformer

    press = QuestPress(page_size=4, dense_layers=0, token_budget=8)
    state = SparseState(press, Transformer(shape("tiny-llama")), 0, 0.0, 8)
    g = torch.Generator().manual_seed(0)
    q, keys = torch.randn(4, 1, 16, generator=g), torch.randn(2, 24, 16, generator=g)
    mask = torch.ones(1, 1, 24, dtype=torch.bool)
    mask[..., 21:] = False  # entries past the row
    obs = RowObserver(state, 20, [20], False)
    _, _, got = state.attend(obs, 0, q, keys, keys, mask, 0.25)
    pages = press.select(q, keys[:, :20])
    want = torch.zeros(4, 24, dtype=torch.bool)
    for h in range(4):
        for page in pages[h].tolist():
            want[h, page * 4:page * 4 + 4] = True
    want[:, 20] = True
    assert torch.equal(got[:, 0], want)


def test_h2o_counts_accepted_draft_queries_as_plain_steps_do(llama):
    """H2O's attention mass with drafts is the committed queries' (accepted nodes moved into place, rejected ones
    never counted): after the same greedy tokens, the same mass as one token a step."""
    def run(**options):
        req = llama.add_request(prompt(90), 30, ignore_eos=True, press="h2o", compression_ratio=0.6,
                                compress_every=0, **options)
        while not req.finished:
            llama.step()
        seq = req.sequences[0]
        return seq.output, seq.press.mass[:, :, :seq.kv.length]

    tokens, mass = run()
    for method, options in (("pld", {}), ("draft", {"model": llama})):
        got, got_mass = run(method=method, method_options=options, adaptive=False)
        assert got == tokens, method
        assert torch.allclose(got_mass, mass, atol=1e-4), method


def test_presses_in_fused_chunks_and_batches(llama):
    fused = fused_engine(llama)
    ps = [prompt(90, s) for s in range(3)]
    alone = [llama.generate(p, 40, ignore_eos=True, press="streaming_llm", compression_ratio=0.5).token_ids
             for p in ps]
    batch = fused.generate(ps, 40, ignore_eos=True, press="streaming_llm", compression_ratio=0.5)
    assert fused.core.runner.chunk_calls  # the press did not keep them off the fused path
    for r, want in zip(batch, alone):
        assert len(r.token_ids) == 40
        assert r.token_ids[:16] == want[:16]  # pressed at other moments after that (chunks end the step)


def test_samples_and_preemption_with_a_press(llama):
    small_pool = decodekit.Engine(llama.model, llama.tokenizer, kv_tokens=320, max_step_tokens=256)
    ps = [prompt(90, s) for s in range(4)]
    out = small_pool.generate(ps, 60, ignore_eos=True, press="snapkv", compression_ratio=0.5, window_size=8)
    assert all(len(r.token_ids) == 60 for r in out)
    samples = small_pool.generate(ps[0], 20, ignore_eos=True, press="h2o", compression_ratio=0.5, n=3,
                                  temperature=1.0, seed=0)
    assert all(len(r.token_ids) == 20 for r in samples)
    alloc = small_pool.core.pool.allocator
    assert alloc.num_free == alloc.capacity


def test_press_arguments_are_checked(llama):
    with pytest.raises(ValueError, match="unknown press"):
        llama.make_request("hi", press="nope")
    with pytest.raises(ValueError, match="no knob"):
        llama.make_request("hi", press="snapkv", press_options={"nope": 1})
    with pytest.raises(ValueError, match="fraction removed"):
        llama.make_request("hi", press="knorm", compression_ratio=1.0)
    with pytest.raises(ValueError, match="quantizes"):
        llama.make_request("hi", press="kivi", compression_ratio=0.5)
    with pytest.raises(ValueError, match="need a press"):
        llama.make_request("hi", compression_ratio=0.5)
    r = llama.make_request("hi", press="snapkv", compression_ratio=0.5, kernel_size=3)
    assert r.press.press_knobs == {"kernel_size": 3}
    assert "test_exact" in PRESSES


def test_generate_command_takes_a_press_and_reports_the_bytes_held(capsys):
    import json

    from decodekit.cli import main

    argv = ["generate", "--model", "random:tiny-llama", "--max-new-tokens", "8", "--raw", "--press", "snapkv",
            "--compression-ratio", "0.5", "-P", "window_size=4", "-P", "kernel_size=3", "--prompt", "a b c d " * 16]
    assert main(argv) == 0
    assert "press snapkv" in capsys.readouterr().err
    assert main(argv + ["--json"]) == 0
    stats = json.loads(capsys.readouterr().out)["stats"]
    assert stats["press"] == "snapkv" and stats["kv_bytes_final"] < stats["kv_bytes_uncompressed"] * 0.75
    assert main(["generate", "--model", "random:tiny-llama", "-P", "window_size=4", "--prompt", "hi"]) == 1
    assert "need --press" in capsys.readouterr().err
    bad = ["generate", "--model", "random:tiny-llama", "--press", "tidal", "-P", "selection_layers=x", "--prompt", "hi"]
    assert main(bad) == 1 and "wrong type" in capsys.readouterr().err


def test_a_press_with_a_per_pass_search_is_refused_and_n_samples_run(llama):
    with pytest.raises(ValueError, match="search strategy"):
        llama.generate([5, 6, 7, 8] * 8, 4, search="beam", num_beams=2, press="snapkv", compression_ratio=0.5,
                       press_options={"window_size": 4})
    out = llama.generate([5, 6, 7, 8] * 8, 4, search="best_of_n", n=2, temperature=1.0, seed=0, press="snapkv",
                         compression_ratio=0.5, press_options={"window_size": 4})
    assert len(out.token_ids) == 4
