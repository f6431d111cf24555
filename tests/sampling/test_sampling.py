"""Each sampling rule against its definition (hand-made distributions) and against transformers' warpers."""
import math

import pytest
import torch
from scipy.stats import chisquare
from transformers.generation import logits_process as hf

from decodekit.sampling import LogitsProcessor, SamplingConfig, apply_penalties, token_counts
from decodekit.sampling import warpers as W


def logits_of(probs) -> torch.Tensor:
    return torch.tensor([probs], dtype=torch.float32).log()


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


P = [0.4, 0.3, 0.15, 0.1, 0.05]  # sorted, entropy ~1.39 nats


def test_top_k_definition():
    assert kept(W.top_k(logits_of(P), 2)) == [0, 1]
    assert kept(W.top_k(logits_of(P), 0)) == [0, 1, 2, 3, 4]


def test_top_p_definition():
    assert kept(W.top_p(logits_of(P), 0.7)) == [0, 1]  # 0.4 + 0.3 reaches 0.7
    assert kept(W.top_p(logits_of(P), 0.71)) == [0, 1, 2]
    assert kept(W.top_p(logits_of(P), 0.1)) == [0]


def test_min_p_definition():
    assert kept(W.min_p(logits_of(P), 0.3)) == [0, 1, 2]  # threshold 0.12


def test_typical_definition():
    # entropy H; keep tokens by |-log p - H| ascending until mass >= 0.5
    p = torch.tensor(P)
    h = float(-(p * p.log()).sum())
    order = (-p.log() - h).abs().argsort().tolist()
    expected, mass = [], 0.0
    for i in order:
        expected.append(i)
        mass += P[i]
        if mass >= 0.5:
            break
    assert kept(W.typical(logits_of(P), 0.5)) == sorted(expected)


def test_epsilon_and_eta_definitions():
    assert kept(W.epsilon(logits_of(P), 0.12)) == [0, 1, 2]
    p = torch.tensor(P)
    h = float(-(p * p.log()).sum())
    threshold = min(0.2, math.sqrt(0.2) * math.exp(-h))
    assert kept(W.eta(logits_of(P), 0.2)) == [i for i, x in enumerate(P) if x >= threshold]


def test_top_h_definition():
    """Greedy: keep adding tokens while the renormalized kept set's entropy stays <= theta * H(p)."""
    p = torch.tensor(P)
    h = float(-(p * p.log()).sum())
    for theta in (0.3, 0.6, 0.9, 1.0):
        expected = []
        for i in range(len(P)):
            q = p[: i + 1] / p[: i + 1].sum()
            if float(-(q * q.log()).sum()) > theta * h:
                break
            expected.append(i)
        assert kept(W.top_h(logits_of(P), theta)) == (expected or [0]), theta


def test_every_rule_keeps_the_top_token():
    x = torch.randn(8, 100, generator=torch.Generator().manual_seed(0)) * 5
    for fn, v in [(W.top_p, 1e-6), (W.min_p, 1.0), (W.epsilon, 0.99), (W.eta, 0.99), (W.top_h, 1e-6), (W.top_k, 1)]:
        out = fn(x, v)
        assert torch.isfinite(out.gather(-1, x.argmax(-1, keepdim=True))).all(), fn.__name__
    # typical sampling keeps the most *typical* token, which need not be the most probable one
    assert (torch.isfinite(W.typical(x, 1e-6)).sum(-1) == 1).all()


@pytest.mark.parametrize("mine, ref", [
    (lambda l: W.top_k(l, 7), hf.TopKLogitsWarper(7)),
    (lambda l: W.top_p(l, 0.8), hf.TopPLogitsWarper(0.8)),
    (lambda l: W.min_p(l, 0.1), hf.MinPLogitsWarper(0.1)),
    (lambda l: W.typical(l, 0.7), hf.TypicalLogitsWarper(0.7)),
    (lambda l: W.epsilon(l, 0.02), hf.EpsilonLogitsWarper(0.02)),
    (lambda l: W.eta(l, 0.02), hf.EtaLogitsWarper(0.02)),
], ids=["top_k", "top_p", "min_p", "typical", "epsilon", "eta"])
def test_warpers_match_transformers(mine, ref):
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(1)) * 3
    ids = torch.zeros(6, 1, dtype=torch.long)
    assert torch.equal(torch.isinf(mine(x.clone())), torch.isinf(ref(ids, x.clone())))


def test_repetition_penalty_matches_transformers():
    x = torch.randn(2, 50, generator=torch.Generator().manual_seed(2))
    ids = torch.tensor([[1, 5, 7, 5], [2, 3, 3, 40]])
    seen = torch.zeros(2, 50, dtype=torch.bool).scatter(1, ids, True)
    ours = apply_penalties(x.clone(), SamplingConfig(repetition_penalty=1.3), seen_mask=seen)
    torch.testing.assert_close(ours, hf.RepetitionPenaltyLogitsProcessor(1.3)(ids, x.clone()))


def test_presence_and_frequency_penalties_definition():
    x = torch.zeros(1, 6)
    counts = token_counts(torch.tensor([1, 1, 4]), 6)[None]
    out = apply_penalties(x, SamplingConfig(presence_penalty=0.5, frequency_penalty=0.25), output_counts=counts)
    assert out[0].tolist() == [0.0, -1.0, 0.0, 0.0, -0.75, 0.0]


def test_greedy_is_a_point_mass_on_the_penalized_argmax():
    x = torch.tensor([[1.0, 3.0, 2.0]])
    proc = LogitsProcessor(SamplingConfig())
    assert proc.probs(x).tolist() == [[0.0, 1.0, 0.0]]
    seen = torch.tensor([[False, True, False]])
    penalized = LogitsProcessor(SamplingConfig(repetition_penalty=2.0)).probs(x, seen_mask=seen)
    assert penalized.tolist() == [[0.0, 0.0, 1.0]]


def test_temperature_scales_before_truncation():
    x = torch.tensor([[2.0, 1.0, 0.0]])
    probs = LogitsProcessor(SamplingConfig(temperature=2.0)).probs(x)
    torch.testing.assert_close(probs, torch.softmax(x / 2.0, -1))


@pytest.mark.parametrize("settings", [dict(temperature=5e-324), dict(temperature=1e-300, top_p=0.5),
                                      dict(temperature=1e-40, typical_p=0.5),
                                      dict(temperature=1.0, repetition_penalty=1e-300)])
def test_tiny_temperatures_and_extreme_penalties_still_give_a_distribution(settings):
    """Dividing by a temperature that underflows, or a penalty that overflows, must not make NaN (a server takes
    such values from any client): the limit is the point mass on the argmax."""
    x = torch.tensor([[1.0, 3.0, 2.0, 3.5]])
    seen = torch.tensor([[False, False, False, True]])  # a penalty < 1 lifts the top token to +inf
    probs = LogitsProcessor(SamplingConfig(**settings)).probs(x, seen_mask=seen)
    assert probs.tolist() == [[0.0, 0.0, 0.0, 1.0]]


def test_seeded_sampling_is_reproducible_and_follows_probs():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    proc = LogitsProcessor(SamplingConfig(temperature=1.0))
    draw = lambda seed: [int(proc.sample(probs, torch.Generator().manual_seed(seed))) for _ in range(1)]  # noqa
    assert draw(3) == draw(3)
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.stack([proc.sample(probs, g) for _ in range(4000)]).flatten(), minlength=4)
    assert chisquare(counts.numpy(), (probs[0] * 4000).numpy()).pvalue > 1e-3


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -0.1, "temperature must be >= 0"),
    ("top_p", 0.0, "top_p must be in (0, 1]"),
    ("top_p", 1.2, "top_p must be in (0, 1]"),
    ("top_k", -1, "top_k must be an integer >= 0"),
    ("min_p", 1.5, "min_p must be in [0, 1]"),
    ("typical_p", 0.0, "typical_p must be in (0, 1]"),
    ("epsilon_cutoff", 1.0, "epsilon_cutoff must be in [0, 1)"),
    ("eta_cutoff", -0.1, "eta_cutoff must be in [0, 1)"),
    ("top_h", 1.5, "top_h must be in [0, 1]"),
    ("repetition_penalty", 0.0, "repetition_penalty must be > 0"),
    ("presence_penalty", 3.0, "presence_penalty must be in [-2, 2]"),
])
def test_validate_rejects_bad_values(field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                       .replace("]", r"\]")):
        SamplingConfig(**{field: value}).validate()
