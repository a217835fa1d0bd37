"""Tests of groupmixnorm.metrics: hand-computed soft gaps, and hard gaps cross-checked with fairlearn."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equal_opportunity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from sklearn.metrics import accuracy_score, average_precision_score

from groupmixnorm.metrics import (
    METRIC_NAMES,
    accuracy,
    average_precision,
    dp_gap,
    dp_gap_hard,
    eodds_gap,
    eodds_gap_hard,
    eopp_gap,
    eopp_gap_hard,
    fairness_report,
    group_rates,
)

SEEDS = (0, 1, 2)


def random_data(seed: int, n_groups: int, labels: str, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores and groups whose rates differ between groups; every group has both labels."""
    rng = np.random.default_rng(seed)
    codes = np.concatenate([np.arange(n_groups), rng.integers(0, n_groups, n - n_groups)])
    y = rng.integers(0, 2, n)
    y[:n_groups], y[n_groups:2 * n_groups] = 0, 1  # both labels in each group, whatever the seed
    codes[n_groups:2 * n_groups] = np.arange(n_groups)
    scores = np.clip(rng.normal(0.35 + 0.25 * y + 0.05 * codes, 0.2), 0.0, 1.0)
    groups = np.array([f"g{c}" for c in codes]) if labels == "str" else codes * 10 + 3
    return y, scores, groups


# ------------------------------------------------------------------------------- hard gaps vs fairlearn

HARD_CASES = pytest.mark.parametrize(
    ("seed", "n_groups", "labels"), list(itertools.product(SEEDS, (2, 4), ("int", "str")))
)


@HARD_CASES
def test_dp_gap_hard_matches_fairlearn(seed: int, n_groups: int, labels: str) -> None:
    y, s, g = random_data(seed, n_groups, labels)
    expected = demographic_parity_difference(y, s >= 0.5, sensitive_features=g)
    assert dp_gap_hard(s, g) == pytest.approx(expected, abs=1e-12)


@HARD_CASES
def test_eopp_gap_hard_matches_fairlearn(seed: int, n_groups: int, labels: str) -> None:
    y, s, g = random_data(seed, n_groups, labels)
    expected = equal_opportunity_difference(y, s >= 0.5, sensitive_features=g)
    assert eopp_gap_hard(y, s, g) == pytest.approx(expected, abs=1e-12)


@HARD_CASES
def test_eodds_gap_hard_matches_fairlearn(seed: int, n_groups: int, labels: str) -> None:
    y, s, g = random_data(seed, n_groups, labels)
    expected = equalized_odds_difference(y, s >= 0.5, sensitive_features=g)
    assert eodds_gap_hard(y, s, g) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_hard_gaps_follow_threshold(threshold: float) -> None:
    y, s, g = random_data(5, 3, "int")
    predicted = s >= threshold
    assert dp_gap_hard(s, g, threshold) == pytest.approx(
        demographic_parity_difference(y, predicted, sensitive_features=g), abs=1e-12)
    assert eopp_gap_hard(y, s, g, threshold) == pytest.approx(
        equal_opportunity_difference(y, predicted, sensitive_features=g), abs=1e-12)
    assert eodds_gap_hard(y, s, g, threshold) == pytest.approx(
        equalized_odds_difference(y, predicted, sensitive_features=g), abs=1e-12)


# ------------------------------------------------------------------------------- soft gaps by hand

# Group a: (y, s) = (0, 0.2), (0, 0.4), (1, 0.6), (1, 1.0)
# Group b: (y, s) = (0, 0.1), (1, 0.5), (1, 0.9)
TINY_Y = [0, 0, 1, 1, 0, 1, 1]
TINY_S = [0.2, 0.4, 0.6, 1.0, 0.1, 0.5, 0.9]
TINY_G = ["a", "a", "a", "a", "b", "b", "b"]


def test_soft_gaps_by_hand() -> None:
    # E[s|a] = 2.2/4 = 0.55, E[s|b] = 1.5/3 = 0.5                   -> dp   = 0.05
    # E[s|a,y=1] = 0.8, E[s|b,y=1] = 0.7                             -> eopp = 0.1
    # E[s|a,y=0] = 0.3, E[s|b,y=0] = 0.1; |0.3-0.1| + |0.8-0.7|      -> eodds = 0.3
    assert dp_gap(TINY_S, TINY_G) == pytest.approx(0.05)
    assert eopp_gap(TINY_Y, TINY_S, TINY_G) == pytest.approx(0.1)
    assert eodds_gap(TINY_Y, TINY_S, TINY_G) == pytest.approx(0.3)


def test_soft_gaps_three_groups_by_hand() -> None:
    # Group means given (y=0, y=1): a (0.2, 0.8), b (0.5, 0.6), c (0.1, 0.9).
    # dp: group means a 0.5, b 0.55, c 0.5 -> 0.05; eopp: 0.9 - 0.6 = 0.3
    # eodds pairs: ab 0.3+0.2 = 0.5, ac 0.1+0.1 = 0.2, bc 0.4+0.3 = 0.7 -> 0.7
    y = [0, 1, 0, 1, 0, 1]
    s = [0.2, 0.8, 0.5, 0.6, 0.1, 0.9]
    g = ["a", "a", "b", "b", "c", "c"]
    assert dp_gap(s, g) == pytest.approx(0.05)
    assert eopp_gap(y, s, g) == pytest.approx(0.3)
    assert eodds_gap(y, s, g) == pytest.approx(0.7)


def test_eodds_gap_is_a_pairwise_max_not_a_sum_of_spreads() -> None:
    # Means given (y=0, y=1): a (0, .5), b (.5, .5), c (.25, 0), d (.25, 1).
    # Pairs: ab .5, ac .25+.5, ad .25+.5, bc .25+.5, bd .25+.5 (all .75 or less), cd 0+1 = 1.0 -> 1.0,
    # whereas spread(y=0) + spread(y=1) = 0.5 + 1.0 = 1.5.
    y = [0, 1] * 4
    s = [0.0, 0.5, 0.5, 0.5, 0.25, 0.0, 0.25, 1.0]
    g = ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert eodds_gap(y, s, g) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", SEEDS)
def test_eodds_gap_three_groups_matches_brute_force(seed: int) -> None:
    y, s, g = random_data(seed, 3, "str", n=300)
    frame = pd.DataFrame({"y": y, "s": s, "g": g})
    means = frame.groupby(["g", "y"])["s"].mean()
    brute = max(
        sum(abs(means[(a, label)] - means[(b, label)]) for label in (0, 1))
        for a, b in itertools.combinations(sorted(set(g)), 2)
    )
    assert eodds_gap(y, s, g) == pytest.approx(brute, abs=1e-12)


def test_dp_gap_is_zero_when_scores_do_not_depend_on_group() -> None:
    rng = np.random.default_rng(3)
    per_group = rng.random(50)
    scores = np.concatenate([rng.permutation(per_group) for _ in range(3)])
    groups = np.repeat([0, 1, 2], 50)
    assert dp_gap(scores, groups) == pytest.approx(0.0, abs=1e-12)
    assert dp_gap_hard(scores, groups) == 0.0


@pytest.mark.parametrize("seed", SEEDS)
def test_gaps_lie_in_unit_interval(seed: int) -> None:
    y, s, g = random_data(seed, 4, "int")
    assert 0.0 <= dp_gap_hard(s, g) <= 1.0
    assert 0.0 <= dp_gap(s, g) <= 1.0
    assert 0.0 <= eopp_gap(y, s, g) <= 1.0
    assert 0.0 <= eodds_gap(y, s, g) <= 2.0


def test_accepts_lists_series_and_torch_tensors() -> None:
    torch = pytest.importorskip("torch")
    y, s, g = random_data(4, 2, "int")
    expected = eodds_gap(y, s, g)
    assert eodds_gap(list(y), list(s), list(g)) == pytest.approx(expected)
    assert eodds_gap(pd.Series(y), pd.Series(s), pd.Series(g)) == pytest.approx(expected)
    scores = torch.tensor(s, requires_grad=True)
    assert eodds_gap(torch.tensor(y), scores, torch.tensor(g)) == pytest.approx(expected)


# ------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("seed", SEEDS)
def test_accuracy_and_ap_match_sklearn(seed: int) -> None:
    y, s, _ = random_data(seed, 2, "int")
    assert accuracy(y, s) == pytest.approx(accuracy_score(y, s >= 0.5), abs=1e-12)
    assert accuracy(y, s, threshold=0.7) == pytest.approx(accuracy_score(y, s >= 0.7), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)


def test_boolean_labels_are_accepted() -> None:
    y, s, g = random_data(0, 2, "int")
    assert accuracy(y.astype(bool), s) == accuracy(y, s)
    assert eopp_gap(y.astype(bool), s, g) == eopp_gap(y, s, g)


# ----------------------------------------------------------------------------------------- summaries


@pytest.mark.parametrize(("seed", "labels"), [(0, "int"), (1, "str")])
def test_group_rates_match_metric_frame(seed: int, labels: str) -> None:
    y, s, g = random_data(seed, 4, labels)
    frame = MetricFrame(
        metrics={"selection_rate": selection_rate, "tpr": true_positive_rate, "fpr": false_positive_rate},
        y_true=y, y_pred=(s >= 0.5).astype(int), sensitive_features=pd.Series(g, name="group"),
    )
    rates = group_rates(y, s, g)
    assert rates.index.name == "group"
    assert list(rates.columns) == [
        "count", "positives", "base_rate", "mean_score", "mean_score_y0", "mean_score_y1",
        "selection_rate", "tpr", "fpr", "accuracy",
    ]
    by_group = frame.by_group.loc[rates.index]
    for column in ("selection_rate", "tpr", "fpr"):
        np.testing.assert_allclose(rates[column].to_numpy(), by_group[column].to_numpy(), atol=1e-12)
    counts = pd.Series(g).value_counts()
    np.testing.assert_array_equal(rates["count"].to_numpy(), counts.loc[rates.index].to_numpy())
    assert rates["positives"].sum() == y.sum()


def test_group_rates_by_hand_and_nan_for_empty_denominators() -> None:
    # Group "c" has only a negative sample, so its TPR and mean score given y=1 are undefined.
    rates = group_rates(TINY_Y + [0], TINY_S + [0.7], TINY_G + ["c"])
    a, c = rates.loc["a"], rates.loc["c"]
    assert (a["count"], a["positives"]) == (4, 2)
    assert a["base_rate"] == pytest.approx(0.5)
    assert a["mean_score"] == pytest.approx(0.55)
    assert (a["mean_score_y0"], a["mean_score_y1"]) == pytest.approx((0.3, 0.8))
    assert (a["selection_rate"], a["tpr"], a["fpr"], a["accuracy"]) == pytest.approx((0.5, 1.0, 0.0, 1.0))
    assert np.isnan(c["tpr"]) and np.isnan(c["mean_score_y1"])
    assert c["base_rate"] == 0.0
    assert c["fpr"] == 1.0


def test_group_rates_allows_a_single_group() -> None:
    rates = group_rates([0, 1, 1], [0.2, 0.7, 0.4], ["x", "x", "x"])
    assert list(rates.index) == ["x"]
    assert rates.loc["x", "tpr"] == pytest.approx(0.5)


def test_fairness_report_keys_and_values() -> None:
    y, s, g = random_data(0, 3, "str")
    report = fairness_report(y, s, g)
    assert tuple(report) == METRIC_NAMES
    assert all(type(value) is float for value in report.values())
    assert report["dp_gap"] == dp_gap(s, g)
    assert report["eodds_gap_hard"] == eodds_gap_hard(y, s, g)
    assert report["ap"] == average_precision(y, s)


# ------------------------------------------------------------------------------------------ validation


def test_length_mismatch_names_the_lengths() -> None:
    with pytest.raises(ValueError, match=r"same length.*3.*2"):
        eopp_gap([0, 1, 1], [0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        accuracy([0, 1], [0.5])


@pytest.mark.parametrize("function", [dp_gap, dp_gap_hard])
def test_empty_input_is_rejected(function) -> None:
    with pytest.raises(ValueError, match="empty"):
        function([], [])


def test_two_dimensional_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="1-D"):
        dp_gap(np.zeros((3, 2)), [0, 1, 0])


@pytest.mark.parametrize("labels", [[0, 2, 1, 0], [0.0, 0.5, 1.0, 1.0], ["no", "yes", "no", "yes"]])
def test_non_binary_labels_are_rejected(labels) -> None:
    with pytest.raises(ValueError, match="y_true must be binary 0/1"):
        eodds_gap(labels, [0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores_are_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="scores contain NaN"):
        dp_gap([0.1, bad, 0.3, 0.4], [0, 0, 1, 1])
    with pytest.raises(ValueError, match="scores contain NaN"):
        average_precision([0, 1, 0, 1], [0.1, bad, 0.3, 0.4])


@pytest.mark.parametrize("function", [dp_gap, dp_gap_hard])
def test_one_group_is_rejected_by_dp_gaps(function) -> None:
    with pytest.raises(ValueError, match="need at least two groups"):
        function([0.1, 0.6, 0.3], ["a", "a", "a"])


@pytest.mark.parametrize("function", [eopp_gap, eodds_gap, eopp_gap_hard, eodds_gap_hard, fairness_report])
def test_one_group_is_rejected_by_label_gaps(function) -> None:
    with pytest.raises(ValueError, match="need at least two groups"):
        function([0, 1, 1], [0.1, 0.6, 0.3], [7, 7, 7])


@pytest.mark.parametrize("function", [eopp_gap, eodds_gap, eopp_gap_hard, eodds_gap_hard])
def test_group_without_positives_is_named(function) -> None:
    with pytest.raises(ValueError, match="group 'b' has no positive"):
        function([0, 1, 0, 0], [0.1, 0.6, 0.3, 0.7], ["a", "a", "b", "b"])


@pytest.mark.parametrize("function", [eodds_gap, eodds_gap_hard])
def test_group_without_negatives_is_named(function) -> None:
    with pytest.raises(ValueError, match="group 2 has no negative"):
        function([0, 1, 1, 1], [0.1, 0.6, 0.3, 0.7], [1, 1, 2, 2])


def test_eopp_ignores_groups_without_negatives() -> None:
    # Only positives are needed for equal opportunity: (0.6 - 0.5) with group 2 all positive.
    assert eopp_gap([0, 1, 1, 1], [0.1, 0.6, 0.3, 0.7], [1, 1, 2, 2]) == pytest.approx(0.1)


def test_missing_group_labels_are_rejected() -> None:
    with pytest.raises(ValueError, match="groups contain missing values"):
        dp_gap([0.1, 0.2, 0.3], ["a", None, "b"])
