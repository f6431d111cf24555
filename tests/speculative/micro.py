"""A micro model (6-token vocabulary) whose exact next-pair distribution is computable: for chi-square tests."""
from __future__ import annotations

from typing import Callable

import torch
from scipy.stats import chisquare

from decodekit.engine import Engine
from decodekit.models.config import ModelConfig
from decodekit.models.kv_cache import private_pool
from decodekit.models.loader import build_native
from decodekit.sampling import LogitsProcessor, SamplingConfig

VOCAB = 6
MICRO_PROMPT = [1, 2, 3, 1, 2, 3, 1, 2]


class IdTokenizer:
    eos_token_id = None
    chat_template = None

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))

    def encode(self, text, add_special_tokens=False):
        return [int(t) for t in text.split()]


def micro_model(seed: int, scale: float):
    """Random weights scaled by `scale`: larger weights give peaked, context-dependent distributions."""
    config = ModelConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                         num_kv_heads=1, head_dim=16, max_position_embeddings=512, eos_token_ids=[])
    model = build_native(config, None, torch.device("cpu"), torch.float32, seed=seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(scale)
    return model


def micro_engine(seed: int = 3, scale: float = 8.0) -> Engine:
    return Engine(micro_model(seed, scale), IdTokenizer(), name="micro")


def exact_pair_distribution(engine: Engine, sampling: SamplingConfig,
                            allowed: Callable[[list[int]], torch.Tensor] | None = None) -> torch.Tensor:
    """P(t2, t3) after MICRO_PROMPT under `sampling`, marginalized over t1, from the target alone. `allowed(output)`
    (bool `[VOCAB]`): a constraint, masking the logits before the sampling rules (as the engine does)."""
    proc = LogitsProcessor(sampling)
    model = engine.model

    def dist(seq):
        _, kv = private_pool(model, 64)
        with torch.no_grad():
            logits = model.forward_seq(kv, seq, list(range(len(seq))), logits="last").float()
        if allowed is not None:
            logits = logits.masked_fill(~allowed(seq[len(MICRO_PROMPT):]), float("-inf"))
        return proc.probs(logits)[0]

    p1 = dist(MICRO_PROMPT)
    joint = torch.zeros(VOCAB, VOCAB)
    for t1 in range(VOCAB):
        if p1[t1] == 0:
            continue
        p2 = dist(MICRO_PROMPT + [t1])
        for t2 in range(VOCAB):
            if p2[t2] > 0:
                joint[t2] += p1[t1] * p2[t2] * dist(MICRO_PROMPT + [t1, t2])
    return joint.flatten()


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test; cells expected fewer than 5 times are pooled into one (the test's validity condition)."""
    assert counts[probs == 0].sum() == 0, "sampled a pair the target gives probability 0"
    expected = probs / probs.sum() * counts.sum()
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(chisquare(obs.numpy(), exp.numpy()).pvalue)


def spawned(drafter, keep_state: bool = False) -> list:
    """Record the per-sequence copies the engine makes of a drafter instance (their state is the sequence's);
    `keep_state`: the copies keep their own KV memory when their sequence ends, for a test to inspect."""
    copies = []
    spawn = drafter.spawn

    def record(*args):
        copy = spawn(*args)
        if keep_state:
            copy.finish = lambda tokens: None
        copies.append(copy)
        return copy

    drafter.spawn = record
    return copies
