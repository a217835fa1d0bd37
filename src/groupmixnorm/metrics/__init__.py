"""Accuracy, average precision and fairness gaps (soft and thresholded, two or more groups)."""

from groupmixnorm.metrics.fairness import (
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

__all__ = [
    "METRIC_NAMES", "accuracy", "average_precision", "dp_gap", "dp_gap_hard", "eodds_gap", "eodds_gap_hard",
    "eopp_gap", "eopp_gap_hard", "fairness_report", "group_rates",
]
