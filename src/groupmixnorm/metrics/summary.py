"""Every headline metric of one model on one split, in one dictionary (what records and reports store)."""

from __future__ import annotations

from typing import Any

from groupmixnorm.metrics.distribution import abcc, dp_ks, eodds_ks
from groupmixnorm.metrics.fairness import (
    _validated, accuracy, average_precision, dp_gap, dp_gap_hard, dp_ratio, eodds_gap, eodds_gap_hard, eopp_gap,
    eopp_gap_hard,
)

#: The keys of :func:`fairness_report`, in order: accuracy and AP; the soft gaps (Fair Mixup's, for
#: comparison with published numbers); the thresholded gaps and ratio (fairlearn's); the threshold-free gaps.
METRIC_NAMES = (
    "accuracy", "ap", "dp_gap", "eopp_gap", "eodds_gap", "dp_gap_hard", "eopp_gap_hard", "eodds_gap_hard", "dp_ratio",
    "dp_ks", "eodds_ks", "abcc",
)


def fairness_report(y_true: Any, scores: Any, groups: Any, threshold: float = 0.5) -> dict[str, float]:
    """All headline metrics at once.

    Parameters
    ----------
    y_true : array-like of shape (n,)
        Binary labels (0/1 or booleans).
    scores : array-like of shape (n,)
        Predicted scores in [0, 1].
    groups : array-like of shape (n,)
        Sensitive attribute, at least two distinct values, each with positive and negative samples.
    threshold : float, default 0.5
        Decision threshold of ``accuracy``, the hard gaps and the ratio.

    Returns
    -------
    dict of str to float
        The keys of :data:`METRIC_NAMES`, values plain Python floats.
    """
    y, s, g = _validated(y_true, scores, groups)
    return {
        "accuracy": accuracy(y, s, threshold),
        "ap": average_precision(y, s),
        "dp_gap": dp_gap(s, g),
        "eopp_gap": eopp_gap(y, s, g),
        "eodds_gap": eodds_gap(y, s, g),
        "dp_gap_hard": dp_gap_hard(s, g, threshold),
        "eopp_gap_hard": eopp_gap_hard(y, s, g, threshold),
        "eodds_gap_hard": eodds_gap_hard(y, s, g, threshold),
        "dp_ratio": dp_ratio(s, g, threshold),
        "dp_ks": dp_ks(s, g),
        "eodds_ks": eodds_ks(y, s, g),
        "abcc": abcc(s, g),
    }
