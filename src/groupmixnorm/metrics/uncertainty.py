"""How sure a number is: bootstrap intervals for one model's metrics, paired comparisons across seeds,
and a warning when a group is too small for its rates to mean much."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from groupmixnorm.metrics.fairness import _validated

#: Below this many rows a group's rates move by several points from one sample to the next.
MIN_GROUP_ROWS = 50

Metric = Callable[[np.ndarray, np.ndarray, np.ndarray], float]


class SmallGroupWarning(UserWarning):
    """A group has too few rows for its rates (and the gaps built from them) to be reliable."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with the ends of its confidence interval."""

    estimate: float
    low: float
    high: float

    def __contains__(self, value: float) -> bool:
        return self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.estimate:.4f} [{self.low:.4f}, {self.high:.4f}]"


def warn_small_groups(groups: Any, *, where: str, minimum: int = MIN_GROUP_ROWS) -> list[Any]:
    """Warn (:class:`SmallGroupWarning`, one per call) about groups with fewer than ``minimum`` rows.

    Parameters
    ----------
    groups : array-like of shape (n,)
        Group of each row.
    where : str
        What the rows are, for the message (e.g. ``"the test split"``).
    minimum : int, default :data:`MIN_GROUP_ROWS`
        The smallest group size that is not warned about.

    Returns
    -------
    list
        The small groups, sorted by name.
    """
    names, counts = np.unique(np.asarray(groups), return_counts=True)
    small = [(name, int(count)) for name, count in zip(names.tolist(), counts) if count < minimum]
    if small:
        listed = ", ".join(f"{name!r} ({count})" for name, count in small)
        warnings.warn(f"{where} has groups with fewer than {minimum} rows: {listed}; their rates and gaps are noisy",
                      SmallGroupWarning, stacklevel=2)
    return [name for name, _ in small]


def bootstrap_interval(
    metric: Metric,
    y_true: Any,
    scores: Any,
    groups: Any,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``metric(y, scores, groups)`` for one model on one split.

    Rows are resampled with replacement within each (group, label) cell, so that every resample keeps each
    group's size and base rate and every gap stays defined; what varies is which people were drawn.

    Parameters
    ----------
    metric : callable
        ``metric(y, scores, groups) -> float`` on numpy arrays (e.g. ``lambda y, s, g: dp_gap_hard(s, g)``).
    y_true, scores, groups : array-like of shape (n,)
        Labels (0/1), scores and the sensitive attribute.
    resamples : int, default 1000
        Number of bootstrap resamples.
    confidence : float, default 0.95
        Coverage of the interval, in (0, 1).
    seed : int, default 0
        Seed of the resampling, so that the interval is repeatable.

    Returns
    -------
    Interval
        The metric on the data as given, and the percentile interval.
    """
    return bootstrap_intervals(lambda y, s, g: [metric(y, s, g)], y_true, scores, groups, resamples=resamples,
                               confidence=confidence, seed=seed)[0]


def bootstrap_intervals(
    metrics: Callable[[np.ndarray, np.ndarray, np.ndarray], Sequence[float]],
    y_true: Any,
    scores: Any,
    groups: Any,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[Interval]:
    """:func:`bootstrap_interval` of several numbers computed together from each resample.

    ``metrics(y, scores, groups)`` returns the same number of values on every resample (say, every cell of
    one :func:`~groupmixnorm.metrics.group_rates` table); each gets its own percentile interval, all from
    the same resampled rows, which are those :func:`bootstrap_interval` draws with the same ``seed``.
    Computing them together saves the work they share.

    Returns
    -------
    list of Interval
        One per value of ``metrics``, in its order.
    """
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    y, s, g = _validated(y_true, scores, groups, min_groups=1)
    cells = _cells(y, g)
    rng = np.random.default_rng(seed)
    estimates = np.asarray(metrics(y, s, g), dtype=float)
    values = np.empty((resamples, estimates.size))
    for index in range(resamples):
        rows = np.concatenate([rng.choice(cell, size=len(cell), replace=True) for cell in cells])
        values[index] = metrics(y[rows], s[rows], g[rows])
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail], axis=0)
    return [Interval(float(e), float(a), float(b)) for e, a, b in zip(estimates, low, high)]


def _cells(y: np.ndarray, groups: np.ndarray) -> list[np.ndarray]:
    """Row indices of each (group, label) cell that has rows."""
    cell = np.unique(groups, return_inverse=True)[1].reshape(-1) * 2 + y
    return [np.flatnonzero(cell == index) for index in np.unique(cell)]


Verdict = Literal["wins", "ties", "loses"]


@dataclass(frozen=True)
class PairedComparison:
    """Method A against method B over the same seeds: the mean difference ``A - B`` and its t interval."""

    difference: Interval
    seeds: int

    def verdict(self, higher_is_better: bool = True) -> Verdict:
        """``"ties"`` when the interval holds zero (the difference is inside the noise), else who is better."""
        if 0.0 in self.difference:
            return "ties"
        better = self.difference.estimate > 0
        return "wins" if better == higher_is_better else "loses"


def mean_interval(values: Any, *, confidence: float = 0.95) -> Interval:
    """The mean of ``values`` (one per seed) with Student's t interval; a point for one value or no spread."""
    data = np.asarray(values, dtype=float)
    if data.ndim != 1 or len(data) == 0:
        raise ValueError(f"mean_interval needs a non-empty 1-D array, got shape {data.shape}")
    if not np.isfinite(data).all():
        raise ValueError("mean_interval needs finite values")
    mean = float(data.mean())
    spread = float(data.std(ddof=1)) if len(data) > 1 else 0.0
    if spread == 0.0:
        return Interval(mean, mean, mean)
    half = float(stats.t.ppf(0.5 + confidence / 2.0, len(data) - 1)) * spread / math.sqrt(len(data))
    return Interval(mean, mean - half, mean + half)


def paired_comparison(a: Any, b: Any, *, confidence: float = 0.95) -> PairedComparison:
    """Compare two methods' values on the same seeds (``a[i]`` and ``b[i]`` share seed ``i``).

    The interval is Student's t interval of the mean paired difference (:func:`mean_interval`). At least
    two seeds are needed.
    """
    first, second = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired values must be two 1-D arrays of one length, got {first.shape} and {second.shape}")
    if len(first) < 2:
        raise ValueError(f"a paired comparison needs at least two seeds, got {len(first)}")
    return PairedComparison(mean_interval(first - second, confidence=confidence), len(first))
