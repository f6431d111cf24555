"""AWRS: its tokens follow the masked distribution (chi-square), its weight is unbiased, and it checks few tokens."""
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from decodekit.constrain import AWRS, awrs_sample, constraint_spec, masked_probs
from decodekit.constrain.base import Matcher

from constrain_helpers import encode

P8 = torch.tensor([0.30, 0.05, 0.20, 0.10, 0.15, 0.02, 0.08, 0.10])
ALLOWED8 = torch.tensor([False, True, False, True, True, False, True, False])  # Z = 0.05 + 0.10 + 0.15 + 0.08


class SetMatcher(Matcher):
    """A fake matcher over a fixed allowed set that counts `allows` calls (only what AWRS uses is real)."""

    def __init__(self, allowed: torch.Tensor) -> None:
        self.mask, self.vocab_size, self.eos_ids, self.calls = allowed, allowed.numel(), (), 0

    def allowed(self):
        return self.mask.clone()

    def allows(self, token):
        self.calls += 1
        return bool(self.mask[token])

    fill_bitmask = advance = rollback = forced = accepting = done = fork = None


def draw(n, probs, matcher, seed=0, **knobs):
    g = torch.Generator().manual_seed(seed)
    return [awrs_sample(probs, matcher, g, **knobs) for _ in range(n)]


def chi_square_p(tokens, probs):
    """p-value of `tokens` against `probs` (cells with expected count < 5 pooled into one)."""
    n = len(tokens)
    counts = Counter(tokens)
    support = probs.nonzero().flatten().tolist()
    expected = np.array([float(probs[t]) for t in support], dtype=np.float64)
    expected *= n / expected.sum()
    observed = np.array([counts.get(t, 0) for t in support], dtype=float)
    assert sum(counts.values()) == observed.sum(), "a token outside the support was sampled"
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum()) if (~big).any() else observed
    exp = np.append(expected[big], expected[~big].sum()) if (~big).any() else expected
    return chisquare(obs, exp).pvalue


@pytest.mark.parametrize("knobs", [dict(), dict(weight=False), dict(max_rejects=1)])
def test_tokens_follow_the_masked_distribution(knobs):
    results = draw(10000, P8, SetMatcher(ALLOWED8), **knobs)
    target = masked_probs(P8, ALLOWED8)
    assert chi_square_p([r.token for r in results], target) > 1e-3
    if knobs.get("max_rejects") == 1:
        assert any(r.masked for r in results) and not all(r.masked for r in results)


def test_the_chi_square_check_detects_a_wrong_distribution():
    results = draw(10000, P8, SetMatcher(ALLOWED8))
    wrong = masked_probs(P8 + torch.tensor([0, 0.01, 0, 0, 0, 0, 0, 0]), ALLOWED8)  # a little more mass on token 1
    assert chi_square_p([r.token for r in results], wrong) < 1e-3


def test_weight_is_an_unbiased_estimate_of_the_allowed_mass():
    for allowed in [ALLOWED8, torch.tensor([False] * 7 + [True]), torch.ones(8, dtype=torch.bool)]:
        z = float((P8 * allowed).sum())
        w = np.array([r.weight for r in draw(10000, P8, SetMatcher(allowed), seed=1)])
        se = w.std() / np.sqrt(len(w))
        assert abs(w.mean() - z) < 4.5 * se + 1e-12, (w.mean(), z)
    scaled = np.array([r.weight for r in draw(4000, 3 * P8, SetMatcher(ALLOWED8), seed=2)])
    assert abs(scaled.mean() - 3 * float((P8 * ALLOWED8).sum())) < 4.5 * scaled.std() / np.sqrt(len(scaled))
    assert all(r.weight == 0.0 for r in draw(50, P8, SetMatcher(ALLOWED8), weight=False))


def test_mask_fallback_gives_the_exact_mass():
    results = draw(200, P8, SetMatcher(ALLOWED8), max_rejects=0)
    z = float((P8 * ALLOWED8).sum())
    assert all(r.masked and r.checks == 0 and r.weight == pytest.approx(z) for r in results)


def test_no_allowed_mass_gives_no_token():
    probs = torch.tensor([0.5, 0, 0.5, 0, 0, 0, 0, 0])  # only tokens the grammar rejects
    for knobs in [dict(), dict(max_rejects=1)]:
        r = awrs_sample(probs, SetMatcher(ALLOWED8), torch.Generator().manual_seed(0), **knobs)
        assert r.token is None and r.weight == 0.0
    assert masked_probs(probs, ALLOWED8).sum() == 0


def test_few_checks_when_the_likely_tokens_are_allowed():
    """The point of AWRS: a model that mostly agrees with the grammar costs about two checks, not V."""
    vocab = 50000
    probs = torch.full((vocab,), 0.05 / (vocab - 3))
    probs[[7, 8, 9]] = 0.95 / 3
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[[7, 8, 9, 100, 200]] = True
    matcher = SetMatcher(allowed)
    results = draw(300, probs, matcher)
    assert matcher.calls == sum(r.checks for r in results)
    assert matcher.calls / len(results) < 3 and max(r.checks for r in results) < 100


def test_masked_probs_rows():
    probs = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.4, 0.0]])
    allowed = torch.tensor([[True, False, True], [False, False, True]])
    out = masked_probs(probs, allowed)
    assert torch.allclose(out[0], torch.tensor([0.2 / 0.7, 0.0, 0.5 / 0.7])) and out[1].sum() == 0


def test_awrs_dataclass_and_bad_shape():
    r = AWRS(weight=False).sample(P8, SetMatcher(ALLOWED8), torch.Generator().manual_seed(0))
    assert bool(ALLOWED8[r.token]) and r.weight == 0.0
    with pytest.raises(ValueError, match="one distribution"):
        awrs_sample(P8[None], SetMatcher(ALLOWED8))


@pytest.mark.parametrize("backend", ["llguidance"])
def test_real_tokenizer_state(smol, backend):
    """One JSON state on the real tokenizer (an integer value is next): AWRS over the full 49,152-token vocabulary
    against the masked distribution, and far fewer grammar checks than the vocabulary size."""
    compiler = smol[backend]
    m = compiler.compile(constraint_spec(json_schema={"type": "object", "properties": {"n": {"type": "integer"}},
                                                      "required": ["n"]})).matcher()
    m.advance(encode(compiler, '{"n": '))
    allowed = m.allowed()
    assert 5 < allowed.sum() < 100
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(m.vocab_size, generator=g) * 2
    logits[allowed.nonzero().flatten()[:6]] += 10  # the model mostly agrees with the grammar, not entirely
    probs = logits.softmax(-1)
    assert 0.2 < float(probs[allowed].sum()) < 0.95
    results = [awrs_sample(probs, m, g) for _ in range(1000)]
    assert chi_square_p([r.token for r in results], masked_probs(probs, allowed)) > 1e-3
    assert sum(r.checks for r in results) / len(results) < 20
