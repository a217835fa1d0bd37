"""Accuracy, average precision and fairness gaps (soft, thresholded and threshold-free, two or more groups),
with bootstrap intervals and paired comparisons in :mod:`groupmixnorm.metrics.uncertainty`."""

from groupmixnorm.metrics.distribution import abcc, dp_ks, eodds_ks
from groupmixnorm.metrics.fairness import (
    accuracy,
    average_precision,
    dp_gap,
    dp_gap_hard,
    dp_ratio,
    eodds_gap,
    eodds_gap_hard,
    eopp_gap,
    eopp_gap_hard,
    group_rates,
)
from groupmixnorm.metrics.sanity import useless_model_warnings
from groupmixnorm.metrics.summary import METRIC_NAMES, fairness_report

__all__ = [
    "METRIC_NAMES", "abcc", "accuracy", "average_precision", "dp_gap", "dp_gap_hard", "dp_ks", "dp_ratio", "eodds_gap",
    "eodds_gap_hard", "eodds_ks", "eopp_gap", "eopp_gap_hard", "fairness_report", "group_rates",
    "useless_model_warnings",
]
