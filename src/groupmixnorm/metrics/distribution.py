"""Threshold-free gaps: how far apart the groups' whole score distributions are.

A thresholded gap judges the decisions at one threshold; a soft gap (a difference of mean scores) can be
lowered by squeezing every score toward 0.5 without changing a single ranking. These two cannot be gamed
that way:

- ``dp_ks``: the Kolmogorov-Smirnov distance between two groups' score distributions,
  ``sup_t |P(s > t | a) - P(s > t | b)|``: the largest selection-rate gap over *every* threshold. It is
  invariant to any increasing transformation of the scores, so squeezing leaves it unchanged.
- ``eodds_ks``: the same within each label, the larger of the two (the threshold-free analogue of
  fairlearn's equalized-odds difference).
- ``abcc``: the area between the groups' score CDFs on [0, 1] (Han et al., "Retiring ΔDP", TMLR 2023),
  which is the 1-Wasserstein distance between the two distributions. It is threshold-free but not
  scale-free: it shrinks with the scores' spread, like the soft gap, and is reported beside it.

With more than two groups each is the largest over pairs of groups. The distances come from SciPy
(``ks_2samp``, ``wasserstein_distance``).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations
from typing import Any

import numpy as np
from scipy.stats import ks_2samp, wasserstein_distance

from groupmixnorm.metrics.fairness import _rows_with_label, _scores_and_groups, _validated

Distance = Callable[[np.ndarray, np.ndarray], float]


def dp_ks(scores: Any, groups: Any) -> float:
    """Kolmogorov-Smirnov distance between the groups' score distributions (largest over pairs).

    Parameters
    ----------
    scores : array-like of shape (n,)
        Predicted scores (any scale: the distance depends on their order only).
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values.

    Returns
    -------
    float
        ``max_{a,b} sup_t |P(s > t | A=a) - P(s > t | A=b)|``, in [0, 1].
    """
    s, g = _scores_and_groups(scores, groups)
    return _largest_pairwise(s, g, _ks)


def eodds_ks(y_true: Any, scores: Any, groups: Any) -> float:
    """The larger, over the two labels, of the KS distance between groups' scores given that label.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores.
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values, each with positive and negative samples.

    Returns
    -------
    float
        ``max_y max_{a,b} sup_t |P(s > t | A=a, Y=y) - P(s > t | A=b, Y=y)|``, in [0, 1].
    """
    y, s, g = _validated(y_true, scores, groups)
    return max(_within_label(s, y, g, label, _ks) for label in (0, 1))


def abcc(scores: Any, groups: Any) -> float:
    """Area between the groups' score CDFs (largest over pairs): the 1-Wasserstein distance.

    Parameters
    ----------
    scores : array-like of shape (n,)
        Predicted scores in [0, 1].
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values.

    Returns
    -------
    float
        ``max_{a,b} integral_0^1 |F_a(t) - F_b(t)| dt``, in [0, 1].
    """
    s, g = _scores_and_groups(scores, groups)
    if s.min() < 0.0 or s.max() > 1.0:
        raise ValueError(f"abcc needs scores in [0, 1], got values from {s.min():.4g} to {s.max():.4g}")
    return _largest_pairwise(s, g, _area)


def _ks(first: np.ndarray, second: np.ndarray) -> float:
    return float(ks_2samp(first, second).statistic)


def _area(first: np.ndarray, second: np.ndarray) -> float:
    return float(wasserstein_distance(first, second))


def _largest_pairwise(scores: np.ndarray, groups: np.ndarray, distance: Distance) -> float:
    """The largest ``distance`` between the scores of two groups; at least two groups."""
    names = np.unique(groups)
    if len(names) < 2:
        raise ValueError(f"need at least two groups to measure a gap, got {len(names)}")
    by_group = [scores[groups == name] for name in names]
    return max(distance(first, second) for first, second in combinations(by_group, 2))


def _within_label(scores: np.ndarray, y: np.ndarray, groups: np.ndarray, label: int, distance: Distance) -> float:
    chosen = _rows_with_label(y, groups, label)
    return _largest_pairwise(scores[chosen], groups[chosen], distance)
