"""The numbers behind the report's view of a model's decision: bootstrap intervals of every per-group rate,
ratio and gap, the four-fifths view, the majority-class accuracy, a threshold sweep, small-group warnings,
and the validation front of a ``train --max-gap`` search.

Everything is computed by the package's metrics (:func:`~groupmixnorm.metrics.group_rates`,
:func:`~groupmixnorm.metrics.fairness_report`) and its bootstrap
(:func:`~groupmixnorm.metrics.uncertainty.bootstrap_intervals`), with the bootstrap settings and threshold
grid of :mod:`groupmixnorm.experiments.constraint`, so that a report and a search say the same thing.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from groupmixnorm.experiments.constraint import CONFIDENCE, RESAMPLES, THRESHOLDS
from groupmixnorm.metrics import accuracy, dp_gap_hard, eodds_gap_hard, fairness_report, group_rates
from groupmixnorm.metrics.uncertainty import MIN_GROUP_ROWS, SmallGroupWarning, bootstrap_intervals, warn_small_groups

#: The four-fifths rule: a group selected at less than this share of the highest selection rate is flagged.
FOUR_FIFTHS = 0.8
#: The per-group columns that get intervals. Counts and base rates have none: the bootstrap resamples
#: within each (group, label) cell, so every resample keeps them.
INTERVAL_COLUMNS = ("selection_rate", "tpr", "fpr", "accuracy", "mean_score")
#: The columns of every interval table.
INTERVAL_FIELDS = ["estimate", "low", "high"]


def gap_table(rates: pd.DataFrame, metrics: dict[str, float]) -> pd.DataFrame:
    """The largest difference between groups of each rate, and the package's soft gaps.

    ``rates`` is :func:`~groupmixnorm.metrics.group_rates`' table (the false-positive-rate gap is NaN
    without one) and ``metrics`` a :func:`~groupmixnorm.metrics.fairness_report` (or a record's test
    metrics).
    """
    def spread(column: str) -> float:
        return float(rates[column].max() - rates[column].min()) if column in rates and len(rates) else float("nan")

    rows = [
        ("selection rate (demographic parity, dp_gap_hard)", metrics["dp_gap_hard"]),
        ("true positive rate (equal opportunity, eopp_gap_hard)", metrics["eopp_gap_hard"]),
        ("false positive rate", spread("fpr")),
        ("equalized odds: larger of TPR and FPR gaps (eodds_gap_hard)", metrics["eodds_gap_hard"]),
        ("mean score (soft demographic parity, dp_gap)", metrics["dp_gap"]),
        ("mean score of positives (eopp_gap)", metrics["eopp_gap"]),
        ("mean scores given each label, summed (eodds_gap)", metrics["eodds_gap"]),
    ]
    threshold_free = [
        ("selection rate at any threshold (KS distance, dp_ks)", "dp_ks"),
        ("selection rate at any threshold within each label (eodds_ks)", "eodds_ks"),
        ("score CDFs, area between them (abcc)", "abcc"),
    ]
    rows += [(label, metrics[key]) for label, key in threshold_free if key in metrics]  # older runs lack them
    return pd.DataFrame(rows, columns=["between groups, largest difference of", "gap"]).set_index(
        "between groups, largest difference of")


def selection_ratios(rates: pd.DataFrame) -> pd.Series:
    """Each group's selection rate divided by the highest one, the four-fifths rule's view by group.

    The smallest of them is :func:`~groupmixnorm.metrics.dp_ratio`; as there, when no one is selected
    every group has the highest rate and its ratio is 1.
    """
    selected = rates["selection_rate"].astype(float)
    top = selected.max()
    return pd.Series(1.0, index=rates.index) if top == 0 else selected / top


def base_rate(scored: pd.DataFrame | None, rates: pd.DataFrame) -> float | None:
    """The share of positive labels in the test split: from the labels when there are any, else from the
    per-group counts; ``None`` when neither is known."""
    if scored is not None:
        return float(scored["y"].mean())
    if {"count", "positives"} <= set(rates.columns) and rates["count"].sum() > 0:
        return float(rates["positives"].sum() / rates["count"].sum())
    return None


# ------------------------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Intervals:
    """Bootstrap intervals (columns estimate, low, high) of one model's test numbers, all from the same
    ``resamples`` resamples: ``metrics`` by metric name, ``rates`` by (group, rate), ``ratios`` by group and
    ``gaps`` by the rows of :func:`gap_table`."""

    metrics: pd.DataFrame
    rates: pd.DataFrame
    ratios: pd.DataFrame
    gaps: pd.DataFrame
    resamples: int
    confidence: float


def decision_intervals(scored: pd.DataFrame, threshold: float, *, resamples: int = RESAMPLES,
                   seed: int = 0) -> Intervals:
    """Stratified bootstrap intervals of every metric, per-group rate, selection ratio and gap of a model
    on its test split (``scored``: columns ``y``, ``score``, ``group``) at ``threshold``."""
    y, s = scored["y"].to_numpy(), scored["score"].to_numpy()
    names, g = np.unique(scored["group"].to_numpy(), return_inverse=True)  # integer codes group faster
    keys = list(_numbers(y, s, g, threshold, names))
    found = bootstrap_intervals(lambda a, b, c: list(_numbers(a, b, c, threshold, names).values()), y, s, g,
                                resamples=resamples, confidence=CONFIDENCE, seed=seed)

    def part(name: str) -> pd.DataFrame:
        rows = [(key, (i.estimate, i.low, i.high)) for (kind, key), i in zip(keys, found) if kind == name]
        return pd.DataFrame([values for _, values in rows], index=[key for key, _ in rows], columns=INTERVAL_FIELDS)

    rates = part("rates")
    rates.index = pd.MultiIndex.from_tuples(rates.index, names=["group", "rate"])
    return Intervals(part("metrics"), rates, part("ratios"), part("gaps"), resamples, CONFIDENCE)


def _numbers(y: np.ndarray, s: np.ndarray, g: np.ndarray, threshold: float,
             names: np.ndarray) -> dict[tuple[str, Hashable], float]:
    """Every number that gets an interval, keyed by (table, row), groups (codes ``g``) by their ``names``;
    the same keys on every resample, since each keeps every (group, label) cell."""
    rates = group_rates(y, s, g, threshold)
    metrics = fairness_report(y, s, g, threshold)
    numbers: dict[tuple[str, Hashable], float] = {("metrics", key): value for key, value in metrics.items()}
    numbers.update({("rates", (names[code], column)): float(rates.at[code, column])
                    for code in rates.index for column in INTERVAL_COLUMNS})
    numbers.update({("ratios", names[code]): float(value) for code, value in selection_ratios(rates).items()})
    numbers.update({("gaps", row): float(value) for row, value in gap_table(rates, metrics)["gap"].items()})
    return numbers


# ---------------------------------------------------------------------------------- threshold and groups


def threshold_sweep(scored: pd.DataFrame, thresholds: tuple[float, ...] = THRESHOLDS) -> pd.DataFrame:
    """Accuracy, ``dp_gap_hard`` and ``eodds_gap_hard`` of the test scores at each threshold (by default the
    grid a ``--max-gap`` search chooses from, 0.05 to 0.95), one row per threshold."""
    y, s, g = (scored[column].to_numpy() for column in ("y", "score", "group"))
    rows = {t: {"accuracy": accuracy(y, s, t), "dp_gap_hard": dp_gap_hard(s, g, t),
                "eodds_gap_hard": eodds_gap_hard(y, s, g, t)} for t in thresholds}
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = "threshold"
    return frame


def small_group_lines(sizes: pd.Series) -> list[str]:
    """One warning line per group with fewer test rows than
    :func:`~groupmixnorm.metrics.uncertainty.warn_small_groups` accepts (``sizes``: rows per group)."""
    rows = np.repeat(sizes.index.to_numpy(), sizes.to_numpy().astype(int))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SmallGroupWarning)  # the report shows the lines instead
        small = warn_small_groups(rows, where="the test split")
    return [f"Group {name!r} has only {int(sizes[name])} test rows (fewer than {MIN_GROUP_ROWS}): its rates, their "
            "intervals and the gaps it enters are noisy." for name in small]


# ------------------------------------------------------------------------------------------ search front


@dataclass(frozen=True)
class SearchFront:
    """The outputs of a ``train --max-gap`` search: every trial (``front.csv``, with its ``chosen``
    column), the search's ``metrics.json`` and the validation front as PNG bytes."""

    folder: Path
    table: pd.DataFrame
    record: dict[str, Any]
    png: bytes

    @property
    def chosen(self) -> dict[str, Any]:
        """The chosen trial as ``metrics.json`` records it (method, knob, value, options, threshold)."""
        return self.record["chosen"]


def search_front(folder: Path) -> SearchFront | None:
    """The search whose outputs are in ``folder``, or ``None`` when it holds none (no ``front.csv``, or no
    ``metrics.json`` with a chosen trial). Its ``front.png`` is used when present, else the front is drawn
    from ``front.csv`` as the search draws it."""
    from groupmixnorm.experiments.constraint import plot_front

    record_path, front_path = folder / "metrics.json", folder / "front.csv"
    if not (record_path.is_file() and front_path.is_file()):
        return None
    record = json.loads(record_path.read_text(encoding="utf-8"))
    if "chosen" not in record:
        return None
    table = pd.read_csv(front_path)
    png = folder / "front.png"
    if not png.is_file():
        png = plot_front(table, record["bounds"], record["select"], Path(tempfile.mkdtemp()) / "front.png")
    return SearchFront(folder, table, record, png.read_bytes())
