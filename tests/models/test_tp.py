"""Tensor parallelism on the CPU (gloo): each test's ranks 1.. are subprocesses started by `decodekit.load(...,
tensor_parallel=N)` on a free port the OS picks (the rendezvous store binds port 0); every test closes its group
and checks that its processes are gone. Only one group lives at a time (one per process), so the tiny model's
group is shared by one class and closed at its end.

Checked: logits equal the single-process model's in float32 (tiny models; SmolLM2 on 3 ranks and Gemma 3 270M on
2 as real_model); greedy output of every registered method, batched, and of every search strategy (arithmetic
sampling excepted) token-identical to single-process decoding,
eagerly and through the graph runner's mirrored static passes (on the CPU a "replay" calls the pass: the message
logic runs, not a CUDA graph); a rank that dies makes the others stop with a clear error instead of hanging; a
rank count that cannot split the heads is a one-line error naming the sizes that work.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist

import decodekit
from decodekit.engine import Engine
from decodekit.engine.tp_group import TPError
from decodekit.models.config import shape
from decodekit.models.kv_cache import private_pool
from decodekit.models.tp import check_world, valid_sizes
from decodekit.sampling import SamplingConfig
from decodekit.search import SEARCHES
from decodekit.speculative import DRAFTERS

PROMPTS = [[5, 6, 7, 8, 9, 10] * 5, list(range(3, 40)), [11, 12, 13] * 3]


def close(engine) -> None:
    """Stop a tensor-parallel engine's ranks and check that none is left running."""
    group = engine.model.group
    engine.model.close()
    for p in group.procs:
        assert p.poll() is not None, "a tensor-parallel worker outlived close()"
    assert not dist.is_initialized()


def logits_of(model, ids: list[int]) -> torch.Tensor:
    """Prefill logits of `ids`, then one decode step's (the cache path), stacked."""
    _, kv = private_pool(model, len(ids) + 2)
    with torch.inference_mode():
        pre = model.forward_seq(kv, ids, list(range(len(ids))))
        step = model.forward_seq(kv, [ids[0]], [len(ids)])
    return torch.cat([pre, step]).float()


def assert_same_logits(tp, ref, ids: list[int]) -> None:
    a, b = logits_of(tp.model, ids), logits_of(ref.model, ids)
    assert a.shape == b.shape
    # the same float32 math, only summed in another order across ranks
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_rank_counts_that_split_the_heads():
    assert valid_sizes(shape("smollm2-135m")) == [1, 3, 9]  # 9 query heads, 3 KV heads
    assert valid_sizes(shape("gemma3-270m")) == [1, 2, 4]  # 4 and 1: the KV head replicated
    assert valid_sizes(shape("llama3-70b")) == [1, 2, 4, 8, 16, 32, 64]
    with pytest.raises(ValueError, match=r"^tensor_parallel=2 cannot split .*sizes that work: 1, 3, 9$"):
        check_world(shape("smollm2-135m"), 2)


@pytest.mark.parametrize("n", [3, 0])
def test_bad_rank_count_is_a_one_line_error_before_any_process(n):
    with pytest.raises(ValueError) as e:
        decodekit.load("random:tiny-llama", device="cpu", tensor_parallel=n)
    assert "\n" not in str(e.value)
    assert ("sizes that work: 1, 2, 4" in str(e.value)) if n == 3 else (">= 1" in str(e.value))
    assert not dist.is_initialized()


def test_fallback_models_are_refused(tmp_path):
    import json

    from decodekit.engine.tp import _config

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_head": 12}))
    with pytest.raises(ValueError, match="tensor parallelism needs a natively supported model"):
        _config(str(tmp_path), tmp_path)


@pytest.fixture(scope="class")
def tiny():
    """(2-rank engine, single-process engine) of the tiny llama, float32."""
    ref = decodekit.load("random:tiny-llama", device="cpu", dtype="float32")
    tp = decodekit.load("random:tiny-llama", device="cpu", dtype="float32", tensor_parallel=2)
    yield tp, ref
    close(tp)


class TestTinyTwoRanks:
    def test_shard_is_local(self, tiny):
        tp, ref = tiny
        c = tp.model.config
        assert (c.num_heads, c.num_kv_heads) == (2, 1)  # 4 and 2 heads over 2 ranks: the pool holds 1 KV head
        assert tp.core.runner.pool.k.shape[-2:] == (1, c.head_dim)
        assert tp.model.local.embed.weight.shape[0] == ref.model.config.vocab_size // 2

    def test_logits_equal_single_process(self, tiny):
        tp, ref = tiny
        assert_same_logits(tp, ref, PROMPTS[1])

    @pytest.mark.parametrize("method", sorted(DRAFTERS))
    def test_greedy_of_every_method_identical(self, tiny, method):
        tp, ref = tiny
        if method in ("magicdec", "triforce", "quantspec"):  # their press reads one rank's pool: refused, one line
            with pytest.raises(ValueError, match="tensor parallelism"):
                tp.generate(PROMPTS, 8, method=method)
            return
        if method in ("eagle", "medusa", "hydra"):
            options = {"init": "random"}  # an untrained head: drafts (through the mirrored embed / lm_head)
        else:
            options = {"model": tp} if method == "draft" else {}  # the TP engine drafts for itself: its own pools
        a = tp.generate(PROMPTS, 32, method=method, ignore_eos=True, method_options=options)
        b = ref.generate(PROMPTS, 32, method=method, ignore_eos=True,
                         method_options={"model": ref} if method == "draft" else options)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
        if method in ("eagle", "medusa", "hydra"):  # the head drafted: the mirrored embedding / LM head ran
            assert any(r.stats.accepted_by_position for r in a)

    @pytest.mark.parametrize("name", sorted(SEARCHES))
    def test_every_search_strategy_identical(self, tiny, name):
        """Search strategies on the core (beams forking pools, DoLa's early exits through the shared norm and LM
        head, n samples seeded). Arithmetic sampling is left out: its code is rescaled by each token's probability,
        so float32 rounding (the ranks sum in another order) decides its later tokens, as its docstring says."""
        if name == "arithmetic":
            pytest.skip("arithmetic sampling amplifies rounding by design (see the docstring)")
        tp, ref = tiny
        options = {"best_of_n": {"n": 3}, "mbr": {"n": 3}, "self_consistency": {"n": 3}, "quality_rerank": {"n": 3},
                   "dola": {"dola_layers": [1]}}.get(name, {})
        sampling = SamplingConfig(temperature=0.8, seed=1) if "n" in options else SamplingConfig()

        def run(engine):
            extra = {"model": engine} if name == "entropy_switch" else {}
            out = engine.generate(PROMPTS[:2], 10, search=name, sampling=sampling, chat=False, stop=[], **options,
                                  **extra)
            return [r.token_ids for r in out]

        assert run(tp) == run(ref)

    def test_graph_runner_passes_are_mirrored(self, tiny):
        tp, ref = tiny
        graphed = Engine(tp.model, tp.tokenizer, cuda_graphs=True)
        for method in ("plain", "pld", "eagle"):  # eagle: passes that return hidden states (its drafting: eager)
            options = {"init": "random"} if method == "eagle" else {}
            a = graphed.generate(PROMPTS, 40, method=method, ignore_eos=True, method_options=options)
            b = ref.generate(PROMPTS, 40, method=method, ignore_eos=True, method_options=options)
            assert [r.token_ids for r in a] == [r.token_ids for r in b]
        assert graphed.core.runner.passes  # the static passes ran (captured on both ranks)
        assert any(key[4] for key in graphed.core.runner.passes)  # some returned the head's features


def test_dead_worker_is_a_clear_error_not_a_hang():
    tp = decodekit.load("random:tiny-llama", device="cpu", dtype="float32", tensor_parallel=2)
    worker = tp.model.group.procs[0]
    worker.kill()
    worker.wait()
    start = time.monotonic()
    with pytest.raises(TPError, match=r"rank 1 exited with code -9"):
        tp.generate(PROMPTS[0], 8)
    assert time.monotonic() - start < 30
    with pytest.raises(TPError):  # the model stays unusable, at once
        tp.generate(PROMPTS[0], 8)
    assert not dist.is_initialized()  # the group was left: a new one can start in this process


RANK0_DIES = textwrap.dedent("""
    import os, decodekit
    engine = decodekit.load("random:tiny-llama", device="cpu", tensor_parallel=2)
    engine.generate([5, 6, 7], 4)
    print(engine.model.group.procs[0].pid, flush=True)
    os._exit(3)  # no close(): rank 0 vanishes
""")


def test_dead_rank0_makes_workers_exit():
    proc = subprocess.Popen([sys.executable, "-c", RANK0_DIES], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        # the worker inherited the pipes: they close only when it has exited too
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 3, err
    assert out.strip().isdigit()
    assert "tensor-parallel rank 1" in err and "exiting" in err, err


@pytest.mark.real_model
@pytest.mark.parametrize("name,world", [("smollm2", 3), ("gemma3-270m", 2)])
def test_real_model_logits_equal_single_process(name, world):
    ref = decodekit.load(name, device="cpu", dtype="float32")
    tp = decodekit.load(name, device="cpu", dtype="float32", tensor_parallel=world)
    try:
        ids = ref.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
        assert_same_logits(tp, ref, ids)
        assert tp.generate(ids, 12).token_ids == ref.generate(ids, 12).token_ids
    finally:
        close(tp)


def cli_json(*flags: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-m", "decodekit.cli", "generate", "--model", "random:tiny-llama",
                          "--device", "cpu", "--dtype", "float32", "--prompt", "abcabcabcabc", "--raw", "--json",
                          "--max-new-tokens", "12", "--method", "pld", *flags],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_cli_generate_tensor_parallel_equals_single_process():
    ref = decodekit.load("random:tiny-llama", device="cpu", dtype="float32")
    expected = ref.generate("abcabcabcabc", 12, method="pld", chat=False).token_ids
    assert cli_json("--tensor-parallel", "2")["token_ids"] == expected


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_cli_bad_rank_count(command, capsys):
    from decodekit.cli import main

    extra = ["--prompt", "x"] if command == "generate" else ["--limit", "1"]
    assert main([command, "--model", "random:tiny-llama", "--device", "cpu", "--tensor-parallel", "3", *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert err == ("decodekit: error: tensor_parallel=3 cannot split random:tiny-llama (4 query heads, 2 KV heads); "
                   "sizes that work: 1, 2, 4")
    assert not dist.is_initialized()


@pytest.mark.slow
def test_torchrun_launch_equals_single_process():
    """The documented launch: every rank runs the CLI; rank 0 prints, the others serve it and exit 0."""
    import json

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "decodekit.cli", "generate", "--model", "random:tiny-llama", "--device", "cpu", "--dtype",
                          "float32", "--tensor-parallel", "2", "--prompt", "abcabcabc", "--raw", "--json",
                          "--max-new-tokens", "8"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # only rank 0 answers
    ref = decodekit.load("random:tiny-llama", device="cpu", dtype="float32")
    assert json.loads(lines[0])["token_ids"] == ref.generate("abcabcabc", 8, chat=False).token_ids


@pytest.mark.slow
def test_serve_tensor_parallel():
    """`decodekit serve --tensor-parallel 2`: the engine thread drives rank 0; a greedy completion equals
    single-process decoding; Ctrl-C stops the server and its worker."""
    import os
    import select
    import signal

    import httpx

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "decodekit.cli", "serve", "--model", "random:tiny-llama",
                             "--device", "cpu", "--dtype", "float32", "--port", "0", "--tensor-parallel", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        line, deadline = "", time.monotonic() + 120
        while "serving" not in line and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline()
        assert "serving" in line, "the server did not start"
        url = line.split(" at ")[1].split()[0]
        body = {"model": "random:tiny-llama", "prompt": "abcabcabc", "max_tokens": 16, "temperature": 0}
        text = httpx.post(url + "/completions", json=body, timeout=60).json()["choices"][0]["text"]
        ref = decodekit.load("random:tiny-llama", device="cpu", dtype="float32")
        assert text == ref.generate("abcabcabc", 16, chat=False).text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
        proc.stdout.read()  # EOF only once the worker (which shares the pipe) has exited too
    finally:
        proc.kill()
