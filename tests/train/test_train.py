"""Training draft heads on a tiny model: data generation, learning, resuming, the command line."""
from __future__ import annotations

import json
import random

import pytest
import torch

import decodekit
from decodekit.train.data import GenerationSettings, feature_pass, generate_dataset, read_prompts, read_split
from decodekit.train.trainer import TrainConfig, acceptance, train

WORDS = "the cat sat on a mat and then it ran far away from home".split()


@pytest.fixture(scope="module")
def tiny():
    """tiny-llama with a sharper LM head: random 0.02-scale weights give near-uniform next-token distributions,
    whose argmax no head can learn from a few hundred tokens; scaled up, the answers depend on the context."""
    engine = decodekit.load("random:tiny-llama", device="cpu")
    with torch.no_grad():
        engine.model.lm_head.weight.mul_(30)
    return engine


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.jsonl"
    rnd = random.Random(0)
    path.write_text("".join(json.dumps({"turns": [" ".join(rnd.choice(WORDS) for _ in range(rnd.randint(3, 8)))]})
                            + "\n" for _ in range(60)))
    return path


SETTINGS = GenerationSettings(num_prompts=32, eval_prompts=8, max_new_tokens=24, batch_size=20)


@pytest.fixture(scope="module")
def data(tiny, prompts, tmp_path_factory):
    layers = (1, tiny.model.config.num_layers)
    return generate_dataset(tiny, prompts, tmp_path_factory.mktemp("data"), layers, SETTINGS, progress=False)


def test_data_holds_the_targets_answers_and_features(tiny, data):
    train_seqs, eval_seqs = read_split(data / "train"), read_split(data / "eval")
    assert len(train_seqs) == 32 and len(eval_seqs) == 8
    s = train_seqs[3]
    plain = tiny.generate(s.tokens[:s.prompt_len].tolist(), 24).token_ids
    assert s.tokens[s.prompt_len:].tolist() == plain  # the target's own greedy answer
    want = feature_pass(tiny.model, s.tokens.tolist(), (1, tiny.model.config.num_layers))
    assert torch.allclose(s.features.float(), want, atol=0.02, rtol=0.02)  # stored in bf16
    shards = sorted((data / "train").iterdir())
    stamp = [p.stat().st_mtime_ns for p in shards]
    generate_dataset(tiny, json.loads((data / "meta.json").read_text())["prompts"], data,
                     (tiny.model.config.num_layers,), SETTINGS, progress=False)  # fewer layers: reused
    assert [p.stat().st_mtime_ns for p in shards] == stamp  # complete shards are kept, not redone
    with pytest.raises(ValueError, match="other settings"):
        generate_dataset(tiny, "unused.jsonl", data, (0,), SETTINGS, progress=False)


def test_benchmarks_are_never_training_data(tmp_path):
    for name in ("spec_bench/question.jsonl", "gsm8k/test.jsonl", "humaneval/HumanEval.jsonl", "mbpp/mbpp.jsonl"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text('{"turns": ["x"]}\n')
        with pytest.raises(ValueError, match="never trained on what measures them"):
            read_prompts(path)


FAST = dict(epochs=3, batch_tokens=512, lr=3e-3, eval_depth=3, draft_steps=2, warmup=0.1, checkpoint_every=1000)


@pytest.mark.slow
@pytest.mark.parametrize("arch,gain", [("eagle", 0.15), ("hydra", 0.1), ("medusa", 0.03)])
def test_training_lowers_loss_and_raises_acceptance(arch, gain, tiny, data, tmp_path):
    """Medusa gains least here: its heads never see the token before the one they guess (x_{t+1}), and this
    random model's answers hinge on it."""
    summary = train(tiny, data, tmp_path, TrainConfig(arch=arch, **FAST), progress=False)
    history = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["history"]
    losses = [r["ce1"] for r in history["train"]]
    k = max(2, len(losses) // 4)
    assert sum(losses[-k:]) / k < 0.8 * sum(losses[:k]) / k
    first, last = summary["first_eval"], summary["final_eval"]
    assert last["cumulative"][0] > first["cumulative"][0] + gain
    assert last["tau"] > first["tau"]
    assert (tmp_path / "loss.png").stat().st_size > 0 and (tmp_path / "acceptance.png").stat().st_size > 0
    # the trained head drafts through the engine, losslessly, and its drafts get accepted on its own data
    seq = read_split(data / "train")[0]
    prompt = seq.tokens[:seq.prompt_len].tolist()
    plain = tiny.generate(prompt, 24)
    spec = tiny.generate(prompt, 24, method=arch, path=str(tmp_path / "head"), adaptive=False)
    assert spec.token_ids == plain.token_ids
    if arch != "medusa":
        assert spec.stats.decode_steps < plain.stats.decode_steps


def test_acceptance_counts_greedy_chains(tiny, data):
    """A head that always guesses right would score 1 at every depth; an untrained one scores its match rate."""
    from decodekit.speculative.heads_common import new_head
    from decodekit.speculative.medusa import MedusaHeads
    from decodekit.train.trainer import head_config

    seqs = read_split(data / "eval")
    layers = json.loads((data / "meta.json").read_text())["layers"]
    head = new_head(MedusaHeads, head_config(TrainConfig(arch="medusa"), tiny.model.config, "t"), 0)
    # zero-initialized Medusa heads repeat the target's next-token guess for every depth: the depth-1 draft is
    # right exactly where the answer repeats its previous token, which is countable directly
    got = acceptance(head, decodekit.speculative.heads_common.Target(tiny.model), seqs, layers, 2, torch.device("cpu"))
    repeats = total = 0
    for s in seqs:
        for t in range(max(s.prompt_len - 2, 0), len(s.tokens) - 2):
            if t + 2 >= s.prompt_len:
                total += 1
                repeats += int(s.tokens[t + 2] == s.tokens[t + 1])
    assert got["positions"] == total
    assert got["cumulative"][0] == pytest.approx(repeats / total)


@pytest.mark.slow
def test_resumed_training_equals_uninterrupted(tiny, data, tmp_path):
    cfg = dict(FAST, epochs=2)
    whole = tmp_path / "whole"
    train(tiny, data, whole, TrainConfig(arch="medusa", **cfg), progress=False)
    part = tmp_path / "part"
    first = train(tiny, data, part, TrainConfig(arch="medusa", **cfg), progress=False, stop_after=3)
    assert first["stopped"] and first["steps"] == 3 and not (part / "head").exists()
    train(tiny, data, part, TrainConfig(arch="medusa", **cfg), progress=False)
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(part / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"]
    for name in a["head"]:
        assert torch.allclose(a["head"][name], b["head"][name], atol=1e-6), name
    with pytest.raises(ValueError, match="other settings"):
        train(tiny, data, part, TrainConfig(arch="medusa", **dict(cfg, lr=1e-3)), progress=False)


def test_train_drafter_command(prompts, tmp_path):
    from decodekit.cli import main

    out = tmp_path / "run"
    args = ["train-drafter", "--model", "random:tiny-llama", "--arch", "eagle", "--prompts", str(prompts),
            "--out", str(out), "--device", "cpu", "--num-prompts", "16", "--eval-prompts", "4",
            "--max-new-tokens", "16", "--epochs", "1", "--batch-tokens", "512", "--eval-depth", "2",
            "--draft-steps", "2", "--fused"]
    assert main(args) == 0
    config = json.loads((out / "head" / "config.json").read_text())
    assert config["arch"] == "eagle" and len(config["feature_layers"]) == 2  # tiny-llama: 2 fused layers
    engine = decodekit.load("random:tiny-llama", device="cpu")
    assert engine.generate([5, 6, 7], 8, method="eagle", path=str(out / "head")).token_ids == \
        engine.generate([5, 6, 7], 8).token_ids
    assert main(["train-drafter", "--model", "random:tiny-llama", "--arch", "eagle", "--prompts",
                 str(tmp_path / "spec_bench" / "question.jsonl"), "--out", str(out)]) == 1
