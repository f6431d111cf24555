"""The CUDA-graph runner's static passes (bucket padding, slot tables and greedy chunks computed inside the pass,
one buffer copy per pass). On the CPU a "replay" calls the captured function, so the same code runs where CI runs;
on a GPU the tests also capture real graphs over torch.compile'd blocks."""
import pytest
import torch

import decodekit
from decodekit.engine import Engine
from decodekit.engine.graphs import StaticPass, kv_bucket
from decodekit.speculative import DRAFTERS
from drafter_options import drafter_options
from kernel_reference import use_references

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PROMPTS = [[5, 6, 7, 8, 9, 10] * 5, list(range(3, 40)), [11, 12, 13] * 3, list(range(50, 58))]


@pytest.fixture(scope="module", params=[(d, s) for d in DEVICES for s in ("random:tiny-llama", "random:tiny-gemma3")])
def engines(request):
    device, source = request.param
    eager = decodekit.load(source, device=device, dtype="float32", cuda_graphs=False)
    graphed = Engine(eager.model, eager.tokenizer, cuda_graphs=True)
    if device == "cuda":
        eager.model.compile_blocks()
    return graphed, eager


@pytest.mark.parametrize("method", sorted(DRAFTERS))
def test_graphed_batches_equal_eager(engines, method):
    graphed, eager = engines
    kw = {"method_options": drafter_options(method, eager)}
    a = graphed.generate(PROMPTS, 40, method=method, ignore_eos=True, **kw)
    b = eager.generate(PROMPTS, 40, method=method, ignore_eos=True, **kw)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]


@pytest.mark.parametrize("method", ["pld", "recycling"])  # chains and trees
def test_verify_passes_through_the_kernels_equal_eager(engines, method, monkeypatch):
    """The static passes with the attention kernels' path (on the CPU: their torch references, given what the
    kernels are given): the eager masked path's tokens."""
    graphed, eager = engines
    if eager.model.windows:  # time: its window layers keep the masked path (tests/models/test_kernels.py has Gemma)
        pytest.skip("Llama only")
    want = eager.generate(PROMPTS, 40, method=method, ignore_eos=True)
    with monkeypatch.context() as m:
        calls = use_references(m) if graphed.device.type == "cpu" else [("tree", 0)]  # cuda: the kernels themselves
        got = graphed.generate(PROMPTS, 40, method=method, ignore_eos=True)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert any(name == "tree" for name, _ in calls)


def test_fused_chunks_of_a_batch_are_used_and_exact(engines):
    graphed, eager = engines
    n = 3 * 16 + 4 + 3  # long fused chunks, a short one, then single steps for the remainder
    a = graphed.generate(PROMPTS, n, ignore_eos=True)
    b = eager.generate(PROMPTS, n, ignore_eos=True)
    assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert any(k[3] == 16 for k in graphed.core.runner.passes)  # a 16-step chunk pass exists
    assert all(r.stats.decode_steps == n - 1 for r in a)


def test_sampled_generation_is_reproducible_under_graphs(engines):
    graphed, _ = engines
    a = graphed.generate(PROMPTS[0], 30, temperature=1.0, seed=3, method="pld").token_ids
    assert a == graphed.generate(PROMPTS[0], 30, temperature=1.0, seed=3, method="pld").token_ids


def test_a_known_shape_is_not_captured_again(engines):
    """Other prompts and output lengths in the same buckets replay what is captured (plain decoding: the shapes do
    not depend on what a drafter happens to find)."""
    graphed, _ = engines
    graphed.generate(PROMPTS, 40, ignore_eos=True)
    before = set(graphed.core.runner.passes)
    graphed.generate([p[::-1] for p in PROMPTS[:3]] + [[7] * 20], 33, ignore_eos=True)
    assert set(graphed.core.runner.passes) == before


ON_DEVICE = {"on_device": True}


def skip_on_gpu(engine) -> None:
    """Token equality with plain decoding holds in float32 on the CPU; on a GPU a pass of another width may round a
    near tie the other way (the GPU figures report how often outputs differ)."""
    if engine.device.type != "cpu":
        pytest.skip("float32 on a GPU: passes of other widths round differently")


@pytest.mark.parametrize("adaptive", [False, True])
def test_draft_rounds_on_the_device_equal_plain_greedy(engines, adaptive):
    """Prompt lookup drafting, verifying and committing on the device, several rounds per replay: the tokens of
    plain greedy decoding, the same acceptance as drafting on the host (full drafts), and the rounds really ran."""
    graphed, eager = engines
    skip_on_gpu(graphed)
    graphed.core.runner.round_passes.clear()
    plain = eager.generate(PROMPTS, 60, ignore_eos=True)
    got = graphed.generate(PROMPTS, 60, method="pld", method_options=ON_DEVICE, ignore_eos=True, adaptive=adaptive)
    assert [r.token_ids for r in got] == [r.token_ids for r in plain]
    assert graphed.core.runner.round_passes
    if not adaptive:
        host = eager.generate(PROMPTS, 60, method="pld", ignore_eos=True, adaptive=False)
        assert [r.stats.tau for r in got] == [r.stats.tau for r in host]
        assert max(r.stats.tau for r in got) > 1.1  # drafts were accepted


def test_sequences_near_their_end_stay_in_the_draft_rounds(engines, monkeypatch):
    """A sequence a few tokens from its end does not send the whole batch to single verified steps: once the
    prompts are in, every step is a replay of fused draft rounds (a round stops a sequence wherever it ends)."""
    graphed, eager = engines
    skip_on_gpu(graphed)
    core, verified = graphed.core, []
    inner = core._verified_step
    monkeypatch.setattr(core, "_verified_step", lambda plan, t0: verified.append(bool(plan.prefills)) or
                        inner(plan, t0))
    prompts = PROMPTS[:2]  # outputs of 30 and 27 tokens: both end inside a replay, at different steps
    reqs = [graphed.add_request(p, n, method="pld", method_options=ON_DEVICE, ignore_eos=True, adaptive=False)
            for p, n in zip(prompts, (30, 27))]
    while not all(r.finished for r in reqs):
        graphed.step()
    want = [eager.generate(p, n, ignore_eos=True).token_ids for p, n in zip(prompts, (30, 27))]
    assert [r.sequences[0].output for r in reqs] == want
    assert verified and all(verified)  # verified steps only while a prompt was being prefilled


@pytest.mark.parametrize("method", ["plain", "pld"])  # fused greedy chunks; fused draft rounds
def test_rows_that_finish_leave_for_a_smaller_pass(engines, method, monkeypatch):
    """Once the rows still decoding fit a smaller batch bucket, they go on in that bucket's pass, moved there on the
    device within the step (the finished rows, here ended by their stop strings, get no more chunks or rounds):
    every row's tokens and finish stay what the eager engine gives."""
    graphed, eager = engines
    skip_on_gpu(graphed)
    moves = []
    take_rows = StaticPass.take_rows
    monkeypatch.setattr(StaticPass, "take_rows", lambda self, other, keep: moves.append((other.rows, self.rows))
                        or take_rows(self, other, keep))
    prompts = PROMPTS + [list(range(20, 31))]  # 5 rows: a bucket of 8; the long ones are not the first rows
    n = 70 if method == "plain" else 24  # plain: 4 chunks of 16 in a step (the first replays are launched ahead)
    kw = {} if method == "plain" else {"method": method, "method_options": ON_DEVICE, "adaptive": False}
    stops, want = [], []
    for row, (prompt, full) in enumerate(zip(prompts, eager.generate(prompts, n, ignore_eos=True))):
        for k in range(4, 12) if row % 2 == 0 else ():  # rows 0, 2, 4 stop after a few tokens: the text so far
            stop = [eager.tokenizer.decode(full.token_ids[:k])]
            if len(eager.generate(prompt, n, ignore_eos=True, stop=stop).token_ids) < n:
                break
        else:
            stop = None
        stops.append(stop)
        want.append(eager.generate(prompt, n, ignore_eos=True, stop=stop))
    assert [len(r.token_ids) < n for r in want] == [True, False, True, False, True]
    reqs = [graphed.add_request(p, n, ignore_eos=True, stop=stop, **kw) for p, stop in zip(prompts, stops)]
    while not all(r.finished for r in reqs):
        graphed.step()
    got = [r.sequences[0].result() for r in reqs]
    assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in want]
    assert moves and moves[-1][1] == 2  # 8 rows, ..., then the 2 long ones alone


def test_a_pass_takes_rows_of_another_and_pads_the_rest(engines):
    """`take_rows`: row r of the smaller pass is row keep[r] of the larger one in every buffer that carries a row's
    state; the rows past them hold padding (block 0, no entries), whatever they held before."""
    graphed, _ = engines
    runner = graphed.core.runner
    length = kv_bucket(1, runner.pool.block_size)
    with torch.inference_mode():  # as the engine runs them (the passes may have been made by an earlier test)
        big, small = runner._pass(4, 1, length, 16), runner._pass(2, 1, length, 16)
        for (buf, _), (junk, _) in zip(big._row_state(), small._row_state()):
            buf.copy_(torch.arange(buf.numel()).view_as(buf) + 1)
            junk.fill_(7)
        small.take_rows(big, [2])
    for (mine, pad), (theirs, _) in zip(small._row_state(), big._row_state()):
        assert torch.equal(mine[0], theirs[2]) and (mine[1:] == pad).all()


def test_draft_rounds_stop_where_plain_decoding_stops(engines):
    """Ends inside a round (EOS, max_new_tokens at every remainder) keep exactly plain decoding's tokens."""
    graphed, eager = engines
    skip_on_gpu(graphed)
    full = eager.generate(PROMPTS[0], 40, ignore_eos=True).token_ids
    eos = full[13]
    for n in (1, 2, 5, 9, 23):
        want = eager.generate(PROMPTS, n, ignore_eos=True)
        got = graphed.generate(PROMPTS, n, method="pld", method_options=ON_DEVICE, ignore_eos=True, adaptive=False)
        assert [(r.token_ids, r.finish_reason) for r in got] == [(r.token_ids, r.finish_reason) for r in want]
    graphed.eos_ids.add(eos)
    try:
        r = graphed.generate(PROMPTS[0], 40, method="pld", method_options=ON_DEVICE, adaptive=False)
    finally:
        graphed.eos_ids.discard(eos)
    assert r.token_ids == full[:full.index(eos) + 1] and r.finish_reason == "stop"
