"""md2pr_jax.significance: paired tests over queries on synthetic per-query values whose answer
is known (a planted difference, the null, an exact small case), Holm against a hand
computation, and the minimal detectable effect against a simulated power."""

import math

import numpy as np
import pytest
from scipy import stats

from md2pr_jax import significance as sig


def _queries(rng, n):
    """Per-query nDCG-like values: many 0s and 1s, as on SciFact."""
    return np.clip(rng.choice([0.0, 1.0, 0.5], size=n, p=[0.2, 0.5, 0.3]) + rng.normal(0, 0.1, n), 0, 1)


def test_a_planted_difference_is_detected_and_its_interval_covers_it():
    rng = np.random.default_rng(0)
    base = _queries(rng, 300)
    other = base + 0.05 + rng.normal(0, 0.2, 300)
    t = sig.paired_test(base, other, permutations=20_000)
    assert t["n"] == 300 and t["mean"] == pytest.approx(np.mean(other - base))
    assert t["ci95"][0] < 0.05 < t["ci95"][1] and t["ci95"][0] > 0
    assert t["p_randomization"] < 1e-3 and t["p_t"] < 1e-3
    half = stats.t.ppf(0.975, 299) * np.std(other - base, ddof=1) / math.sqrt(300)
    assert t["ci95"][1] - t["mean"] == pytest.approx(half)
    assert t["p_t"] == pytest.approx(stats.ttest_rel(other, base).pvalue, rel=1e-9)
    weaker = base + rng.normal(0.01, 0.2, 300)  # a p of order 0.1-0.5, where the tail's shape shows
    assert sig.paired_test(base, weaker, permutations=100)["p_t"] == pytest.approx(stats.ttest_rel(weaker, base).pvalue, rel=1e-9)
    assert t["mde80"] < 0.05 and t["wins"] + t["losses"] == 300


def test_no_difference_under_the_null_rejects_at_the_nominal_rate():
    """Under the null (symmetric per-query noise), p < 0.05 in about 5% of experiments, and the
    randomization p agrees with the t-test's."""
    rng = np.random.default_rng(1)
    ps, pts = [], []
    for _ in range(300):
        base = _queries(rng, 80)
        t = sig.paired_test(base, base + rng.normal(0, 0.2, 80), permutations=1000, seed=int(rng.integers(1 << 30)))
        ps.append(t["p_randomization"])
        pts.append(t["p_t"])
    rate = np.mean(np.array(ps) < 0.05)
    assert 0.02 <= rate <= 0.09, rate
    assert np.median(np.abs(np.array(ps) - np.array(pts))) < 0.02
    same = sig.paired_test(np.arange(5.0), np.arange(5.0), permutations=100)
    assert same["mean"] == 0 and same["p_t"] == 1.0 and same["p_randomization"] == 1.0


def test_randomization_p_of_an_exact_small_case_and_its_seed():
    # d = (1, 1, 1): of the 8 sign patterns, 2 reach |mean| >= 1, so p = 1/4.
    assert sig.randomization_p(np.ones(3), permutations=40_000) == pytest.approx(0.25, abs=0.01)
    d = np.random.default_rng(2).normal(0.1, 1, 50)
    assert sig.randomization_p(d, 5000, seed=3) == sig.randomization_p(d, 5000, seed=3)
    assert sig.randomization_p(d, 5000, seed=3) != sig.randomization_p(d, 5000, seed=4)
    assert sig.randomization_p(d, 5000) > 0  # never 0: (1 + extreme) / (1 + permutations)


def test_holm_against_a_hand_computation():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 -> 0.02, 0.03, 0.06, 0.04 -> running max 0.06.
    assert sig.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert sig.holm([0.5, 0.3]) == pytest.approx([0.6, 0.6])  # 0.5 x 1 < 0.3 x 2: the running max carries 0.6
    assert sig.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])
    out = sig.holm([0.02, float("nan"), 0.01])  # a NaN is not one of the m tests
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)
    assert sig.holm([]) == []


def test_minimal_detectable_effect_has_its_power():
    """A true difference equal to the MDE is found (paired t, p < 0.05) in about 80% of experiments."""
    n, sd = 120, 0.4
    mde = sig.min_detectable(sd, n)
    assert mde == pytest.approx((stats.t.ppf(0.975, n - 1) + stats.t.ppf(0.8, n - 1)) * sd / math.sqrt(n))
    rng = np.random.default_rng(5)
    hits = [stats.ttest_1samp(rng.normal(mde, sd, n), 0).pvalue < 0.05 for _ in range(1000)]
    assert 0.76 <= np.mean(hits) <= 0.84, np.mean(hits)
    assert math.isnan(sig.min_detectable(sd, 1))
    with pytest.raises(ValueError, match="aligned"):
        sig.paired_test(np.zeros(3), np.zeros(4))
