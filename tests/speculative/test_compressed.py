"""Long-context self-speculation (magicdec, triforce, quantspec): lossless against plain greedy, with a draft cache
that is really compressed, also when the target's own cache is pressed. (Sampled losslessness: test_lossless.py.)"""
from contextlib import closing

import pytest
import torch

import decodekit
from decodekit.engine import Engine
from decodekit.models.kv_cache import SeqKV, private_pool

from engine_helpers import fused_engine

SMALL = {"magicdec": {"budget": 24, "compress_every": 8}, "triforce": {"budget": 24, "window_size": 8},
         "quantspec": {"residual": 16, "group": 16}}


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3"])
def engine(request):
    return decodekit.load(f"random:{request.param}", device="cpu")


def long_prompt(seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(3, 500, (12,), generator=g).tolist()
    return motif * 8 + torch.randint(3, 500, (40,), generator=g).tolist()


@pytest.mark.parametrize("method", sorted(SMALL))
def test_greedy_identical_to_plain_with_a_compressed_draft_cache(method, engine):
    p = long_prompt()
    plain = engine.generate(p, 40, ignore_eos=True)
    seen = []
    req = engine.add_request(p, 40, ignore_eos=True, method=method, adaptive=False, method_options=SMALL[method])
    while not req.finished:
        engine.step()
        drafter = req.sequences[0].drafter
        if drafter.state is not None and not req.finished:
            seen.append((drafter.cache.length, drafter.cache.written, drafter.cache.virtual))
    seq = req.sequences[0]
    assert seq.output == plain.token_ids
    assert seq.stats.decode_steps < plain.stats.decode_steps  # drafts were accepted
    if method == "quantspec":
        assert any(v > 0 for _, _, v in seen)  # old blocks were packed out of the draft pool
    elif method == "magicdec":  # a sliding budget: sinks and a window, pressed again every 8 tokens
        assert max(length for length, _, _ in seen) <= 24 + 8 + 4  # budget + slack + the root and a draft
    else:  # the prompt pressed to the budget once; generated tokens all kept
        assert all(length <= 24 + written - len(p) for length, written, _ in seen)
    if method != "quantspec":  # eviction: fewer entries than tokens
        assert all(length < written for length, written, _ in seen)
    # The drafters' own pool is empty once the sequence ends.
    assert all(pool.allocator.num_free == pool.allocator.capacity for pool in seq.drafter.pool_holder)


@pytest.mark.parametrize("method", sorted(SMALL))
def test_with_a_pressed_target(method, engine):
    p = long_prompt(1)
    want = engine.generate(p, 30, ignore_eos=True, press="snapkv", compression_ratio=0.5, window_size=8)
    got = engine.generate(p, 30, ignore_eos=True, press="snapkv", compression_ratio=0.5, press_options={
        "window_size": 8}, method=method, adaptive=False, method_options=SMALL[method])
    assert got.token_ids == want.token_ids


@pytest.mark.parametrize("method", ["magicdec", "triforce"])
def test_fused_chunk_drafting_over_the_small_cache(method, engine):
    """Where the runner has fused greedy chunks (CUDA graphs on a GPU; here their eager reference), an eviction
    draft cache drafts with one chunk of num_draft steps: same tokens as plain decoding."""
    fused = Engine(engine.model, engine.tokenizer)
    runner = fused.core.runner
    runner.fused_sizes, calls, inner = (16, 4), [], runner.greedy_chunks
    runner.greedy_chunks = lambda kvs, roots, pos, steps, chunks, **kw: calls.append((chunks, steps)) or \
        inner(kvs, roots, pos, steps, chunks, **kw)
    p = long_prompt(2)
    plain = fused.generate(p, 40, ignore_eos=True)
    got = fused.generate(p, 40, ignore_eos=True, method=method, adaptive=False,
                         method_options={**SMALL[method], "num_draft": 3})
    assert got.token_ids == plain.token_ids
    assert (1, 3) in calls  # one chunk of 3 draft steps
    assert got.stats.decode_steps < plain.stats.decode_steps or plain.stats.decode_steps <= 3


@pytest.mark.parametrize("method", ["magicdec", "triforce"])
def test_a_batch_drafts_together_and_keeps_accepted_drafts(method, engine):
    """Several sequences of one method: every step's drafts come from one fused chunk over all their caches, the
    tokens are plain greedy's, and a draft the target accepted keeps its entry (it is not fed again): the draft
    cache's entries stay in strictly increasing positions, and few tokens go through feeding passes."""
    fused = fused_engine(engine)
    runner = fused.core.runner
    widths, inner_run, inner_chunks, in_chunk, reqs = [], runner.run, runner.greedy_chunks, [], []

    def chunks(*args, **kw):  # the eager reference of a chunk runs its steps through `run`: not counted below
        in_chunk.append(1)
        try:
            yield from inner_chunks(*args, **kw)
        finally:
            in_chunk.pop()

    def run(specs, *args):  # the tokens fed to draft caches (not to a sequence's own cache)
        if not in_chunk:
            widths.append(sum(len(s.tokens) for s in specs if all(s.kv is not r.sequences[0].kv for r in reqs)))
        return inner_run(specs, *args)
    runner.greedy_chunks, runner.run = chunks, run
    prompts = [long_prompt(s) for s in (3, 4, 5)]
    plain = [fused.generate(p, 40, ignore_eos=True).token_ids for p in prompts]
    runner.chunk_calls.clear()
    widths.clear()
    reqs[:] = [fused.add_request(p, 40, ignore_eos=True, method=method, adaptive=False,
                              method_options={**SMALL[method], "num_draft": 4}) for p in prompts]
    while not all(r.finished for r in reqs):
        fused.step()
        for r in reqs:
            d = r.sequences[0].drafter
            if d.state is not None and not r.finished:
                pos = d.cache.pool.slot_pos[d.cache.slot_tensor()]
                assert bool((pos[1:] > pos[:-1]).all())
    assert [r.sequences[0].output for r in reqs] == plain
    assert (1, 4) in runner.chunk_calls  # drafts of a step: one chunk of 4 steps ...
    steps = sum(r.sequences[0].stats.decode_steps for r in reqs)
    assert runner.chunk_calls.count((1, 4)) < steps  # ... for the sequences together
    out = sum(len(r.sequences[0].output) for r in reqs)
    assert out > 1.5 * steps  # drafts were accepted
    assert sum(widths) < (out - steps) / 2  # fed again, every accepted draft would be: out - steps tokens or so


def window_draft(model, context: list[int], sink: int, window: int, steps: int) -> list[int]:
    """The reference: a greedy chain from the root over a cache that holds only the context's first `sink` entries
    and the `window` before the root (copied out of a prefilled full cache, as the host drafters build theirs)."""
    root = len(context) - 1
    pool, full = private_pool(model, 2 * (len(context) + steps) + 32, block_size=16)  # both caches
    model.forward_seq(full, context[:root], list(range(root)), None, "none")
    small = SeqKV(pool)
    small.append_from(full, list(range(min(sink, root))) + list(range(max(sink, root - window), root)))
    tokens, token = [], context[-1]
    for j in range(steps):
        token = int(model.forward_seq(small, [token], [root + j])[-1].argmax())
        tokens.append(token)
    return tokens


def test_magicdec_rounds_draft_over_a_window_of_the_targets_own_cache(engine):
    """Fused draft rounds (a GPU's captured graphs; here their eager reference): magicdec drafts with the target
    reading the first n_sink entries and the last budget - n_sink of its *own* cache. The tokens are plain greedy's,
    and every round's draft is the greedy chain over a cache holding exactly those entries."""
    # Rings of the least `ring_pass`: they wrap within the prompt, so the rounds read them from a moving first entry.
    graphed = Engine(engine.model, engine.tokenizer, cuda_graphs=True, ring_pass=16)
    runner, inner, seen = graphed.core.runner, graphed.core.runner.draft_rounds, []

    def record(kvs, contexts, drafter, depth, rounds, chunks, **kw):  # (context, draft) of every round
        contexts = [list(c) for c in contexts]
        with closing(inner(kvs, [list(c) for c in contexts], drafter, depth, rounds, chunks, **kw)) as run:
            for rows in run:
                for context, row in zip(contexts, rows):
                    for draft, new in row:
                        seen.append((list(context), draft))
                        context += new
                yield rows
    runner.draft_rounds = record
    prompts, n = [long_prompt(6), long_prompt(7)[:70]], 30
    plain = engine.generate(prompts, n, ignore_eos=True)
    got = graphed.generate(prompts, n, ignore_eos=True, method="magicdec", adaptive=False,
                           method_options={"budget": 24, "n_sink": 4, "num_draft": 4})
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    checked = [(c, d) for c, d in seen if len(c) < len(prompts[0]) + n][::3]
    assert len(checked) >= 4 and all(len(d) == 4 for _, d in checked)
    for context, draft in checked:
        assert draft == window_draft(engine.model, context, 4, 20, 4)
    assert max(r.stats.tau for r in got) > 1.2  # drafts were accepted


def test_knobs_are_checked(engine):
    with pytest.raises(ValueError):
        engine.add_request("x", method="magicdec", budget=0)
    with pytest.raises(ValueError):
        engine.add_request("x", method="quantspec", bits=3)
