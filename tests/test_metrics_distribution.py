"""Threshold-free gaps (KS, ABCC), bootstrap intervals and paired comparisons."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference
from scipy import stats

from groupmixnorm.metrics.distribution import abcc, dp_ks, eodds_ks
from groupmixnorm.metrics.fairness import dp_gap, dp_gap_hard
from groupmixnorm.metrics.uncertainty import (
    SmallGroupWarning, bootstrap_interval, paired_comparison, warn_small_groups,
)


def test_ks_of_two_known_samples_by_hand() -> None:
    # F_a steps to 1/3, 2/3, 1 at 0.1, 0.2, 0.3; F_b to 1/2, 1 at 0.2, 0.4: the largest gap is 1/2 on [0.3, 0.4).
    scores = [0.1, 0.2, 0.3, 0.2, 0.4]
    groups = ["a", "a", "a", "b", "b"]
    assert dp_ks(scores, groups) == pytest.approx(0.5)
    # The area between the CDFs: 0.1 * (1/3 + 1/6 + 1/2).
    assert abcc(scores, groups) == pytest.approx(0.1)


def test_ks_of_two_uniforms_shifted_by_a_quarter_is_a_quarter() -> None:
    """U(0, 0.75) against U(0.25, 1): the CDFs differ by exactly 1/3 between 0.25 and 0.75 (KS), and their
    area is the shift, 0.25; large samples come within the Dvoretzky-Kiefer-Wolfowitz bound of both."""
    rng = np.random.default_rng(0)
    n = 20_000
    scores = np.concatenate([rng.uniform(0, 0.75, n), rng.uniform(0.25, 1.0, n)])
    groups = np.repeat([0, 1], n)
    # DKW: each empirical CDF is within eps of its CDF with probability >= 1 - 2 exp(-2 n eps^2) (~1e-17 here).
    eps = 0.02
    assert abs(dp_ks(scores, groups) - 1 / 3) <= 2 * eps
    assert abs(abcc(scores, groups) - 0.25) <= 2 * eps


def test_ks_is_the_largest_selection_rate_gap_over_every_threshold() -> None:
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 2, 120)
    scores = rng.beta(2 + groups, 3, 120)
    over_thresholds = max(
        demographic_parity_difference(groups, scores > t, sensitive_features=groups) for t in np.unique(scores)
    )
    assert dp_ks(scores, groups) == pytest.approx(over_thresholds, abs=1e-12)
    assert dp_ks(scores, groups) >= dp_gap_hard(scores, groups) - 1e-12


def test_eodds_ks_bounds_fairlearn_s_equalized_odds_at_any_threshold() -> None:
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 3, 900)
    y = (rng.random(900) < 0.3 + 0.2 * (groups == 1)).astype(int)
    scores = rng.beta(2 + y + 0.5 * groups, 3, 900)
    within = eodds_ks(y, scores, groups)
    for threshold in (0.2, 0.4, 0.5, 0.7):
        assert equalized_odds_difference(y, scores > threshold, sensitive_features=groups) <= within + 1e-12


def test_squeezing_scores_lowers_the_soft_gap_but_not_ks() -> None:
    """The reason for KS: a monotone map of the scores toward 0.5 keeps every ranking, so it keeps KS."""
    rng = np.random.default_rng(3)
    groups = rng.integers(0, 2, 1000)
    scores = rng.beta(2 + 2 * groups, 3, 1000)
    squeezed = 0.5 + (scores - 0.5) * 0.05
    assert dp_gap(squeezed, groups) < 0.1 * dp_gap(scores, groups)
    assert dp_ks(squeezed, groups) == pytest.approx(dp_ks(scores, groups), abs=1e-12)


def test_more_than_two_groups_take_the_largest_pair() -> None:
    scores = np.array([0.1, 0.2, 0.5, 0.6, 0.9, 0.95])
    groups = np.array([0, 0, 1, 1, 2, 2])
    assert dp_ks(scores, groups) == 1.0  # groups 0 and 2 do not overlap
    assert abcc(scores, groups) == pytest.approx(0.775)  # the distance between their means, 0.925 - 0.15


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="at least two groups"):
        dp_ks([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="group 'b' has no positive samples"):
        eodds_ks([1, 0, 0], [0.1, 0.2, 0.3], ["a", "a", "b"])
    with pytest.raises(ValueError, match=r"abcc needs scores in \[0, 1\]"):
        abcc([-1.0, 2.0], [0, 1])


def test_bootstrap_interval_holds_the_estimate_and_shrinks_with_more_rows() -> None:
    rng = np.random.default_rng(4)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        groups = rng.integers(0, 2, n)
        y = (rng.random(n) < 0.4).astype(int)
        return y, rng.beta(2 + groups, 3, n), groups

    gap = lambda y, s, g: dp_gap_hard(s, g)  # noqa: E731
    small = bootstrap_interval(gap, *sample(200), resamples=300, seed=0)
    large = bootstrap_interval(gap, *sample(20_000), resamples=300, seed=0)
    assert small.low <= small.estimate <= small.high
    assert large.low <= large.estimate <= large.high
    # The width falls like 1/sqrt(n): 100 times the rows, a tenth of the width (a factor 3 of slack).
    assert (large.high - large.low) < 0.3 * (small.high - small.low)


def test_bootstrap_interval_is_repeatable_and_keeps_every_group_and_label() -> None:
    y = np.array([0, 1] * 10 + [0, 1])
    scores = np.linspace(0.05, 0.95, 22)
    groups = np.array([0] * 20 + [1, 1])  # group 1 has one negative and one positive row
    seen = []

    def recording(y_: np.ndarray, s_: np.ndarray, g_: np.ndarray) -> float:
        seen.append(((g_ == 1) & (y_ == 1)).sum())
        return dp_gap_hard(s_, g_)

    first = bootstrap_interval(recording, y, scores, groups, resamples=40, seed=5)
    assert set(seen) == {1}  # every resample keeps group 1's single positive cell at one row
    assert first == bootstrap_interval(lambda a, b, c: dp_gap_hard(b, c), y, scores, groups, resamples=40, seed=5)


def test_bootstrap_interval_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="resamples"):
        bootstrap_interval(lambda y, s, g: 0.0, [0, 1], [0.1, 0.2], [0, 1], resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_interval(lambda y, s, g: 0.0, [0, 1], [0.1, 0.2], [0, 1], confidence=1.0)


def test_paired_comparison_matches_scipy_and_calls_a_tie_a_tie() -> None:
    a = np.array([0.71, 0.73, 0.70, 0.72, 0.74])
    b = a - np.array([0.010, 0.012, 0.008, 0.011, 0.009])
    comparison = paired_comparison(a, b)
    expected = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert (comparison.difference.low, comparison.difference.high) == pytest.approx((expected.low, expected.high))
    assert comparison.verdict() == "wins"
    assert comparison.verdict(higher_is_better=False) == "loses"
    noisy = paired_comparison(a, a + np.array([0.01, -0.01, 0.02, -0.02, 0.0]))
    assert noisy.verdict() == "ties"
    with pytest.raises(ValueError, match="at least two seeds"):
        paired_comparison([0.1], [0.2])


def test_small_groups_are_warned_about_by_name() -> None:
    with pytest.warns(SmallGroupWarning, match=r"the test split has groups with fewer than 50 rows: 'x' \(3\)"):
        assert warn_small_groups(["x"] * 3 + ["y"] * 60, where="the test split") == ["x"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_small_groups(["y"] * 60, where="the test split") == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_ratio_matches_fairlearn(seed: int) -> None:
    from fairlearn.metrics import demographic_parity_ratio

    from groupmixnorm.metrics import dp_ratio

    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 3, 300)
    scores = rng.beta(2 + groups, 3, 300)
    expected = demographic_parity_ratio(groups, scores >= 0.5, sensitive_features=groups)
    assert dp_ratio(scores, groups) == pytest.approx(expected, abs=1e-12)
    assert dp_ratio(np.zeros(4), [0, 0, 1, 1]) == 1.0  # no one selected: the four-fifths rule holds


def test_the_report_holds_every_metric_and_matches_each_function() -> None:
    from groupmixnorm.metrics import METRIC_NAMES, fairness_report

    rng = np.random.default_rng(5)
    groups = rng.integers(0, 2, 400)
    y = (rng.random(400) < 0.4).astype(int)
    scores = rng.beta(2 + y + groups, 3, 400)
    report = fairness_report(y, scores, groups)
    assert tuple(report) == METRIC_NAMES
    assert report["dp_ks"] == dp_ks(scores, groups)
    assert report["eodds_ks"] == eodds_ks(y, scores, groups)
    assert report["abcc"] == abcc(scores, groups)
