"""The percentile bootstrap against known cases and scipy's implementation."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from decodekit.eval.stats import bootstrap_ci


def test_constant_values_have_a_point_interval():
    assert bootstrap_ci([1.0] * 20) == (1.0, 1.0)
    assert bootstrap_ci([0.0]) == (0.0, 0.0)


def test_binary_half_matches_the_normal_approximation():
    values = [0.0, 1.0] * 200  # mean 0.5, standard error sqrt(0.25 / 400) = 0.025
    low, high = bootstrap_ci(values)
    assert low == pytest.approx(0.5 - 1.96 * 0.025, abs=0.008)
    assert high == pytest.approx(0.5 + 1.96 * 0.025, abs=0.008)


def test_agrees_with_scipy_percentile_bootstrap():
    values = np.random.default_rng(1).exponential(size=60)
    low, high = bootstrap_ci(values, confidence=0.9)
    ref = stats.bootstrap((values,), np.mean, confidence_level=0.9, method="percentile", n_resamples=20_000,
                          random_state=np.random.default_rng(2)).confidence_interval
    assert low == pytest.approx(ref.low, abs=0.02) and high == pytest.approx(ref.high, abs=0.02)
    assert low < values.mean() < high


def test_seeded_and_bounded():
    values = [0.0, 1.0, 1.0, 0.0, 1.0]
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    low, high = bootstrap_ci(values)
    assert 0.0 <= low <= 0.6 <= high <= 1.0


@pytest.mark.parametrize("values, confidence, message", [
    ([], 0.95, "non-empty"), ([1.0], 1.5, "confidence must be in"),
])
def test_bad_input(values, confidence, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(values, confidence)
