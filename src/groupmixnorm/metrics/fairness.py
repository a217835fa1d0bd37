"""Accuracy, average precision and group-fairness gaps, soft (on scores) and thresholded.

Soft gaps follow Fair Mixup (Chuang & Mroueh, ICLR 2021): differences of mean scores between groups.
Thresholded gaps follow fairlearn's definitions (selection rate, true and false positive rates at a
threshold). With more than two groups every gap is the largest over pairs of groups.

Depends on numpy, pandas and scikit-learn only; fairlearn cross-checks these in the tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

METRIC_NAMES = ("accuracy", "ap", "dp_gap", "eopp_gap", "eodds_gap", "dp_gap_hard", "eopp_gap_hard", "eodds_gap_hard")


def accuracy(y_true: Any, scores: Any, threshold: float = 0.5) -> float:
    """Share of samples whose thresholded score equals the label."""
    y, s = _labels(y_true), _scores(scores)
    _same_length(y=y, scores=s)
    return float(np.mean((s >= threshold) == y))


def average_precision(y_true: Any, scores: Any) -> float:
    """Average precision of the scores (scikit-learn's ``average_precision_score``)."""
    y, s = _labels(y_true), _scores(scores)
    _same_length(y=y, scores=s)
    return float(average_precision_score(y, s))


def dp_gap(scores: Any, groups: Any) -> float:
    """Soft demographic-parity gap: the largest difference of mean scores between two groups."""
    s, g = _scores(scores), _groups(groups)
    _same_length(scores=s, groups=g)
    return _spread(_conditional_means(s, g))


def eopp_gap(y_true: Any, scores: Any, groups: Any) -> float:
    """Soft equal-opportunity gap: the largest difference of mean scores on positives between groups."""
    y, s, g = _triple(y_true, scores, groups)
    return _spread(_conditional_means(s[y == 1], g[y == 1], expected=np.unique(g), what="positive"))


def eodds_gap(y_true: Any, scores: Any, groups: Any) -> float:
    """Soft equalized-odds gap: over pairs of groups, the largest sum over y in {0, 1} of the differences
    of mean scores given y (Fair Mixup's definition; a sum, unlike fairlearn's thresholded maximum)."""
    y, s, g = _triple(y_true, scores, groups)
    everyone = np.unique(g)
    by_label = [
        _conditional_means(s[y == label], g[y == label], expected=everyone, what=name)
        for label, name in ((0, "negative"), (1, "positive"))
    ]
    stacked = np.stack([means.to_numpy() for means in by_label])  # (2, groups)
    pairwise = np.abs(stacked[:, :, None] - stacked[:, None, :]).sum(axis=0)
    return float(pairwise.max())


def dp_gap_hard(scores: Any, groups: Any, threshold: float = 0.5) -> float:
    """Largest difference of selection rates (``scores >= threshold``) between groups; fairlearn's
    ``demographic_parity_difference``."""
    s, g = _scores(scores), _groups(groups)
    _same_length(scores=s, groups=g)
    return _spread(_conditional_means((s >= threshold).astype(float), g))


def eopp_gap_hard(y_true: Any, scores: Any, groups: Any, threshold: float = 0.5) -> float:
    """Largest difference of true positive rates between groups; fairlearn's ``equal_opportunity_difference``."""
    y, s, g = _triple(y_true, scores, groups)
    predicted = (s >= threshold).astype(float)
    return _spread(_conditional_means(predicted[y == 1], g[y == 1], expected=np.unique(g), what="positive"))


def eodds_gap_hard(y_true: Any, scores: Any, groups: Any, threshold: float = 0.5) -> float:
    """The larger of the true-positive-rate and false-positive-rate differences between groups;
    fairlearn's ``equalized_odds_difference``."""
    y, s, g = _triple(y_true, scores, groups)
    predicted = (s >= threshold).astype(float)
    everyone = np.unique(g)
    fpr = _conditional_means(predicted[y == 0], g[y == 0], expected=everyone, what="negative")
    tpr = _conditional_means(predicted[y == 1], g[y == 1], expected=everyone, what="positive")
    return max(_spread(fpr), _spread(tpr))


def group_rates(y_true: Any, scores: Any, groups: Any, threshold: float = 0.5) -> pd.DataFrame:
    """Per-group counts, base rate, mean scores, selection rate, TPR, FPR and accuracy.

    One row per group (index ``group``), in the spirit of fairlearn's ``MetricFrame.by_group``. A rate
    with an empty denominator is NaN.
    """
    y, s, g = _triple(y_true, scores, groups, require_two_groups=False)
    predicted = (s >= threshold).astype(float)
    frame = pd.DataFrame({"group": g, "y": y, "score": s, "selected": predicted, "correct": predicted == y})
    by_group = frame.groupby("group", sort=True)
    positives = frame[frame.y == 1].groupby("group")
    negatives = frame[frame.y == 0].groupby("group")
    table = pd.DataFrame({
        "count": by_group.size(),
        "positives": by_group.y.sum(),
        "base_rate": by_group.y.mean(),
        "mean_score": by_group.score.mean(),
        "mean_score_y0": negatives.score.mean(),
        "mean_score_y1": positives.score.mean(),
        "selection_rate": by_group.selected.mean(),
        "tpr": positives.selected.mean(),
        "fpr": negatives.selected.mean(),
        "accuracy": by_group.correct.mean(),
    })
    table["positives"] = table["positives"].astype(int)
    table.index.name = "group"
    return table


def fairness_report(y_true: Any, scores: Any, groups: Any, threshold: float = 0.5) -> dict[str, float]:
    """All headline metrics at once: ``accuracy, ap`` and the six gaps, as plain floats."""
    y, s, g = _triple(y_true, scores, groups)
    return {
        "accuracy": accuracy(y, s, threshold),
        "ap": average_precision(y, s),
        "dp_gap": dp_gap(s, g),
        "eopp_gap": eopp_gap(y, s, g),
        "eodds_gap": eodds_gap(y, s, g),
        "dp_gap_hard": dp_gap_hard(s, g, threshold),
        "eopp_gap_hard": eopp_gap_hard(y, s, g, threshold),
        "eodds_gap_hard": eodds_gap_hard(y, s, g, threshold),
    }


# ------------------------------------------------------------------------------------------- helpers


def _conditional_means(
    values: np.ndarray, groups: np.ndarray, *, expected: np.ndarray | None = None, what: str = ""
) -> pd.Series:
    means = pd.Series(values).groupby(groups, sort=True).mean()
    if expected is not None:
        missing = sorted(set(expected.tolist()) - set(means.index.tolist()))
        if missing:
            raise ValueError(f"group {missing[0]!r} has no {what} samples, so the gap is undefined")
    if len(means) < 2:
        raise ValueError(f"need at least two groups to measure a gap, got {len(means)}")
    return means


def _spread(means: pd.Series) -> float:
    return float(means.max() - means.min())


def _triple(
    y_true: Any, scores: Any, groups: Any, *, require_two_groups: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y, s, g = _labels(y_true), _scores(scores), _groups(groups)
    _same_length(y_true=y, scores=s, groups=g)
    if require_two_groups and len(np.unique(g)) < 2:
        raise ValueError(f"need at least two groups to measure a gap, got {len(np.unique(g))}")
    return y, s, g


def _one_dimensional(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values.detach().cpu() if hasattr(values, "detach") else values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def _labels(y_true: Any) -> np.ndarray:
    y = _one_dimensional(y_true, "y_true")
    if y.dtype == bool:
        return y.astype(int)
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true must be binary 0/1, got values {np.unique(y)[:5].tolist()}")
    return y.astype(int)


def _scores(scores: Any) -> np.ndarray:
    s = _one_dimensional(scores, "scores").astype(float)
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or infinite values")
    return s


def _groups(groups: Any) -> np.ndarray:
    return _one_dimensional(groups, "groups")


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
