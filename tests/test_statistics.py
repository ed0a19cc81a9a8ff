"""Intervals and paired tests over folds against independent computations."""

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from mdser.statistics import (
    paired_comparison,
    smallest_wilcoxon_p,
    t_interval,
    wilcoxon_p,
)

# --- Student-t interval -------------------------------------------------------------------


def test_t_interval_by_hand():
    # 3 folds: mean 0.5, s = 0.1; with 2 degrees of freedom the t quantile has a closed form,
    # t_p = (2p - 1) / sqrt(2 p (1 - p)): t_{0.975, 2} = 0.95 / sqrt(0.04875) = 4.3027 (t tables)
    lo, hi = t_interval([0.4, 0.5, 0.6], 0.95)
    t = 0.95 / math.sqrt(2 * 0.975 * 0.025)
    assert t == pytest.approx(4.3027, abs=1e-4)
    half = t * 0.1 / math.sqrt(3)
    assert lo == pytest.approx(0.5 - half, abs=1e-12) and hi == pytest.approx(0.5 + half, abs=1e-12)


@pytest.mark.parametrize("n", [2, 3, 5, 10])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_t_interval_equals_scipy(n, confidence):
    x = np.random.default_rng(n).uniform(0.2, 0.8, n)
    expected = stats.t.interval(confidence, n - 1, loc=x.mean(), scale=stats.sem(x))
    np.testing.assert_allclose(t_interval(x, confidence), expected, rtol=1e-12)


def test_t_interval_needs_two_folds_and_is_degenerate_for_equal_values():
    assert t_interval([0.5], 0.95) is None and t_interval([], 0.95) is None
    assert t_interval([0.3, 0.3, 0.3], 0.95) == (0.3, 0.3)


# --- Wilcoxon signed-rank ----------------------------------------------------------------


def exact_signed_rank_p(d):
    """Two-sided p from all 2^n sign patterns of the ranks (no ties, no zeros)."""
    ranks = stats.rankdata(np.abs(d))
    t_obs = ranks[np.asarray(d) > 0].sum()
    ts = np.array([sum(r for r, s in zip(ranks, signs, strict=True) if s)
                   for signs in itertools.product([0, 1], repeat=len(d))])
    return min(1.0, 2 * min(np.mean(ts <= t_obs), np.mean(ts >= t_obs)))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6, 8])
def test_wilcoxon_p_equals_the_exact_sign_permutation_p(n):
    rng = np.random.default_rng(20 + n)
    for _ in range(5):
        d = rng.normal(0.01, 0.05, n)
        assert wilcoxon_p(d) == pytest.approx(exact_signed_rank_p(d), abs=1e-12)


def test_wilcoxon_p_equals_scipy_with_zeros_and_ties():
    d = [0.0, 0.05, 0.05, -0.02, 0.1, 0.0, 0.03]
    assert wilcoxon_p(d) == pytest.approx(stats.wilcoxon(d).pvalue, abs=1e-12)


def test_wilcoxon_p_all_zero_differences_is_one_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert wilcoxon_p([0.0, 0.0, 0.0]) == 1.0
        assert wilcoxon_p([0.1 - 0.1, 0.3 - 0.1 - 0.2]) == 1.0  # float noise rounded to exact zeros


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10])
def test_smallest_p_is_attained_when_all_folds_agree_in_sign(n):
    d = np.linspace(0.01, 0.05, n)
    assert smallest_wilcoxon_p(d) == min(1.0, 2 / 2**n)
    assert wilcoxon_p(d) == pytest.approx(smallest_wilcoxon_p(d))
    assert smallest_wilcoxon_p(np.append(d, 0.0)) == smallest_wilcoxon_p(d)  # zeros are dropped
    assert smallest_wilcoxon_p([0.0, 0.0]) == 1.0


# --- one ablation step ---------------------------------------------------------------------


def test_paired_comparison():
    row, base = [0.40, 0.55, 0.50], [0.30, 0.50, 0.52]
    c = paired_comparison(row, base, 0.95)
    d = np.subtract(row, base)
    assert c["n"] == 3 and c["delta"] == pytest.approx(d.mean())
    ref = stats.ttest_rel(row, base).confidence_interval(0.95)  # scipy's paired t-test
    np.testing.assert_allclose((c["ci_low"], c["ci_high"]), (ref.low, ref.high), rtol=1e-12)
    assert c["ci_low"] < 0 < c["ci_high"] and c["significant"] is False
    assert c["p"] == pytest.approx(stats.wilcoxon(d).pvalue) and c["p_min"] == 0.25


@pytest.mark.parametrize("n", [2, 4, 10])
def test_significant_is_the_paired_t_test_at_the_interval_level(n):
    rng = np.random.default_rng(30 + n)
    for _ in range(20):
        base = rng.uniform(0.2, 0.6, n)
        row = base + rng.normal(0.05, 0.05, n)
        for confidence in (0.9, 0.95):
            c = paired_comparison(row, base, confidence)
            assert c["significant"] is bool(stats.ttest_rel(row, base).pvalue < 1 - confidence)


def test_paired_comparison_significance_and_single_fold():
    c = paired_comparison([0.6, 0.7, 0.65], [0.3, 0.35, 0.4], 0.95)
    assert c["ci_low"] > 0 and c["significant"] is True and c["p"] == 0.25
    one = paired_comparison([0.6], [0.5], 0.95)
    assert one["ci_low"] is None and one["ci_high"] is None and one["significant"] is None
    assert one["p"] == 1.0 and one["p_min"] == 1.0
    same = paired_comparison([0.5, 0.6], [0.5, 0.6], 0.95)
    assert same["delta"] == 0 and same["p"] == 1.0 and same["significant"] is False
    with pytest.raises(ValueError):
        paired_comparison([0.5, 0.6], [0.5], 0.95)
