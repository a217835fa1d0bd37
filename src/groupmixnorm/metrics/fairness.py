"""Accuracy, average precision and group-fairness gaps, soft (on scores) and thresholded.

Soft gaps follow Fair Mixup (Chuang & Mroueh, ICLR 2021): differences of mean scores between groups.
Thresholded ("hard") gaps follow fairlearn's definitions (selection rate, true and false positive rates
of ``scores >= threshold``). With more than two groups every gap is the largest over pairs of groups.

Depends on numpy, pandas and scikit-learn only; fairlearn cross-checks these in the tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score

_LABEL_NAMES = {0: "negative", 1: "positive"}


# ------------------------------------------------------------------------------------ classification


def accuracy(y_true: Any, scores: Any, threshold: float = 0.5) -> float:
    """Share of samples whose thresholded score equals the label.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores; a sample is predicted positive when ``score >= threshold``.
    threshold : float, default 0.5
        Decision threshold.

    Returns
    -------
    float
        Mean of ``(scores >= threshold) == y_true``.
    """
    y, s = _labels(y_true), _scores(scores)
    _same_length(y_true=y, scores=s)
    return float(np.mean((s >= threshold) == y))


def average_precision(y_true: Any, scores: Any) -> float:
    """Average precision of the scores (scikit-learn's ``average_precision_score``).

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores; higher means more likely positive.

    Returns
    -------
    float
        The average precision.
    """
    y, s = _labels(y_true), _scores(scores)
    _same_length(y_true=y, scores=s)
    return float(average_precision_score(y, s))


# ------------------------------------------------------------------------------------------ soft gaps


def dp_gap(scores: Any, groups: Any) -> float:
    """Soft demographic-parity gap: the largest difference of mean scores between two groups.

    Parameters
    ----------
    scores : array-like of shape (n,)
        Predicted scores, normally in [0, 1].
    groups : array-like of shape (n,)
        Sensitive attribute (ints or strings), at least two distinct values.

    Returns
    -------
    float
        ``max_a E[s | A=a] - min_a E[s | A=a]``.
    """
    s, g = _scores_and_groups(scores, groups)
    return _spread(_group_means(s, g))


def eopp_gap(y_true: Any, scores: Any, groups: Any) -> float:
    """Soft equal-opportunity gap: the largest difference of mean scores on positives between groups.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores, normally in [0, 1].
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values, each with a positive sample.

    Returns
    -------
    float
        ``max_a E[s | A=a, Y=1] - min_a E[s | A=a, Y=1]``.
    """
    y, s, g = _validated(y_true, scores, groups)
    return _spread(_means_given_label(s, y, g, label=1))


def eodds_gap(y_true: Any, scores: Any, groups: Any) -> float:
    """Soft equalized-odds gap, Fair Mixup's definition.

    For each pair of groups ``(a, b)`` the differences of mean scores given ``Y=0`` and given ``Y=1``
    are summed; the gap is the largest such sum. Unlike fairlearn's thresholded version this is a sum
    over labels, not a maximum, so it is not the spread of one per-group quantity.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores, normally in [0, 1].
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values, each with positive and negative samples.

    Returns
    -------
    float
        ``max_{a,b} sum_{y in {0,1}} |E[s | A=a, Y=y] - E[s | A=b, Y=y]|``.
    """
    y, s, g = _validated(y_true, scores, groups)
    # Rows: label 0 and 1; columns: groups in sorted order (both Series hold every group).
    means = np.stack([_means_given_label(s, y, g, label=label).to_numpy() for label in (0, 1)])
    pairwise = np.abs(means[:, :, None] - means[:, None, :]).sum(axis=0)
    return float(pairwise.max())


# ------------------------------------------------------------------------------------- thresholded gaps


def dp_gap_hard(scores: Any, groups: Any, threshold: float = 0.5) -> float:
    """Largest difference of selection rates between groups.

    Equals fairlearn's ``demographic_parity_difference`` of the predictions ``scores >= threshold``.

    Parameters
    ----------
    scores : array-like of shape (n,)
        Predicted scores.
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values.
    threshold : float, default 0.5
        Decision threshold.

    Returns
    -------
    float
        Max minus min over groups of ``P(s >= threshold | A=a)``, in [0, 1].
    """
    s, g = _scores_and_groups(scores, groups)
    return _spread(_group_means(_predict(s, threshold), g))


def eopp_gap_hard(y_true: Any, scores: Any, groups: Any, threshold: float = 0.5) -> float:
    """Largest difference of true positive rates between groups.

    Equals fairlearn's ``equal_opportunity_difference`` of the predictions ``scores >= threshold``.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores.
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values, each with a positive sample.
    threshold : float, default 0.5
        Decision threshold.

    Returns
    -------
    float
        Max minus min over groups of the true positive rate.
    """
    y, s, g = _validated(y_true, scores, groups)
    return _spread(_means_given_label(_predict(s, threshold), y, g, label=1))


def eodds_gap_hard(y_true: Any, scores: Any, groups: Any, threshold: float = 0.5) -> float:
    """The larger of the true- and false-positive-rate differences between groups.

    Equals fairlearn's ``equalized_odds_difference`` (default ``agg="worst_case"``) of the predictions
    ``scores >= threshold``.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores.
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values, each with positive and negative samples.
    threshold : float, default 0.5
        Decision threshold.

    Returns
    -------
    float
        ``max(spread of TPR, spread of FPR)`` over groups.
    """
    y, s, g = _validated(y_true, scores, groups)
    predicted = _predict(s, threshold)
    return max(_spread(_means_given_label(predicted, y, g, label=label)) for label in (0, 1))


def dp_ratio(scores: Any, groups: Any, threshold: float = 0.5) -> float:
    """Smallest selection rate divided by the largest: the four-fifths rule's ratio.

    Equals fairlearn's ``demographic_parity_ratio`` of the predictions ``scores >= threshold``, except when
    no one is selected: fairlearn then gives NaN, and this gives 1.0 (every group has the largest rate, so
    the four-fifths rule holds).

    Parameters
    ----------
    scores : array-like of shape (n,)
        Predicted scores.
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values.
    threshold : float, default 0.5
        Decision threshold.

    Returns
    -------
    float
        ``min_a P(s >= t | A=a) / max_a P(s >= t | A=a)``, in [0, 1]; 0.8 or more passes the rule.
    """
    s, g = _scores_and_groups(scores, groups)
    rates = _group_means(_predict(s, threshold), g)
    return 1.0 if rates.max() == 0 else float(rates.min() / rates.max())


# ----------------------------------------------------------------------------------------- summaries


def group_rates(y_true: Any, scores: Any, groups: Any, threshold: float = 0.5) -> pd.DataFrame:
    """Per-group counts, base rate, mean scores, selection rate, TPR, FPR and accuracy.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores.
    groups : array-like of shape (n,)
        Sensitive attribute; a single group is allowed here.
    threshold : float, default 0.5
        Decision threshold for ``selection_rate``, ``tpr``, ``fpr`` and ``accuracy``.

    Returns
    -------
    pandas.DataFrame
        One row per group (sorted index named ``group``) with columns ``count``, ``positives``,
        ``base_rate``, ``mean_score``, ``mean_score_y0``, ``mean_score_y1``, ``selection_rate``,
        ``tpr``, ``fpr`` and ``accuracy``. A rate whose denominator is zero is NaN.
    """
    y, s, g = _validated(y_true, scores, groups, min_groups=1)
    predicted = _predict(s, threshold)
    frame = pd.DataFrame({"group": g, "y": y, "score": s, "selected": predicted, "correct": predicted == y})
    everyone = frame.groupby("group", sort=True)
    # Groups without negatives (positives) are absent below and become NaN on alignment.
    negatives = frame[frame["y"] == 0].groupby("group")
    positives = frame[frame["y"] == 1].groupby("group")
    table = pd.DataFrame({
        "count": everyone.size(),
        "positives": everyone["y"].sum(),
        "base_rate": everyone["y"].mean(),
        "mean_score": everyone["score"].mean(),
        "mean_score_y0": negatives["score"].mean(),
        "mean_score_y1": positives["score"].mean(),
        "selection_rate": everyone["selected"].mean(),
        "tpr": positives["selected"].mean(),
        "fpr": negatives["selected"].mean(),
        "accuracy": everyone["correct"].mean(),
    }).sort_index()
    table.index.name = "group"
    return table.astype({"count": int, "positives": int})


# ------------------------------------------------------------------------------------------- helpers


def _predict(scores: np.ndarray, threshold: float) -> np.ndarray:
    return (scores >= threshold).astype(float)


def _group_means(values: np.ndarray, groups: np.ndarray) -> pd.Series:
    """Mean of ``values`` per group, sorted by group; at least two groups."""
    means = pd.Series(values).groupby(groups, sort=True).mean()
    if len(means) < 2:
        raise ValueError(f"need at least two groups to measure a gap, got {len(means)}")
    return means


def _means_given_label(values: np.ndarray, y: np.ndarray, groups: np.ndarray, *, label: int) -> pd.Series:
    """Mean of ``values`` per group among samples with ``y == label``; every group must have one."""
    # Not _group_means: a group without such samples must be named before "too few groups" is said.
    chosen = _rows_with_label(y, groups, label)
    return pd.Series(values[chosen]).groupby(groups[chosen], sort=True).mean()


def _rows_with_label(y: np.ndarray, groups: np.ndarray, label: int) -> np.ndarray:
    """The mask ``y == label``; ``ValueError`` naming the first group that has no such row."""
    chosen = y == label
    missing = sorted(set(pd.unique(groups).tolist()) - set(pd.unique(groups[chosen]).tolist()), key=str)
    if missing:
        raise ValueError(
            f"group {missing[0]!r} has no {_LABEL_NAMES[label]} samples (y={label}), so the gap is undefined"
        )
    return chosen


def _scores_and_groups(scores: Any, groups: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scores and groups as checked 1-D arrays of one length (no labels needed)."""
    s, g = _scores(scores), _groups(groups)
    _same_length(scores=s, groups=g)
    return s, g


def _spread(means: pd.Series) -> float:
    return float(means.max() - means.min())


def _validated(
    y_true: Any, scores: Any, groups: Any, *, min_groups: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, scores and groups as checked 1-D arrays of one length."""
    y, s, g = _labels(y_true), _scores(scores), _groups(groups)
    _same_length(y_true=y, scores=s, groups=g)
    n_groups = len(pd.unique(g))
    if n_groups < min_groups:
        raise ValueError(f"need at least two groups to measure a gap, got {n_groups}")
    return y, s, g


def _one_dimensional(values: Any, name: str) -> np.ndarray:
    # Torch tensors (possibly on a GPU, possibly requiring grad) without importing torch.
    if hasattr(values, "detach"):
        values = values.detach().cpu()
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    return array


def _labels(y_true: Any) -> np.ndarray:
    y = _one_dimensional(y_true, "y_true")
    if y.dtype == bool:
        return y.astype(int)
    is_binary = np.issubdtype(y.dtype, np.number) and np.isin(y, (0, 1)).all()
    if not is_binary:
        shown = pd.unique(y)[:5].tolist()
        raise ValueError(f"y_true must be binary 0/1 (or boolean), got values such as {shown}")
    return y.astype(int)


def _scores(scores: Any) -> np.ndarray:
    raw = _one_dimensional(scores, "scores")
    if not np.issubdtype(raw.dtype, np.number) and raw.dtype != bool:
        raise ValueError(f"scores must be numeric, got dtype {raw.dtype}")
    s = raw.astype(float)
    if not np.isfinite(s).all():
        raise ValueError(f"scores contain NaN or infinite values ({int((~np.isfinite(s)).sum())} of {s.size})")
    return s


def _groups(groups: Any) -> np.ndarray:
    g = _one_dimensional(groups, "groups")
    # pandas groupby silently drops missing keys, which would lose samples without a word.
    if pd.isna(g).any():
        raise ValueError("groups contain missing values (NaN/None)")
    return g


def _same_length(**arrays: np.ndarray) -> None:
    lengths = {name: len(array) for name, array in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"inputs must have the same length, got lengths {lengths}")
