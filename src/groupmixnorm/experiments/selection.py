"""Choosing settings on validation, then scoring the choice on test: the benchmark's protocol.

A method's fairness knob is part of the method, so it is tuned as a user would tune it: for each seed,
among the runs of that method (one per setting, all with the same budget), the run with the best
*validation* score whose *validation* gap is within the bound. Only the chosen run's test numbers are
reported. The choice reads the ``val_*`` columns alone; :func:`choose_on_validation` never looks at a test
column, which the tests check by scrambling them.

Seeds are the unit of replication: each seed's choice is one draw of "train this method with this
budget and pick its setting on validation", so methods are compared seed by seed
(:func:`~groupmixnorm.metrics.uncertainty.paired_comparison`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from groupmixnorm.metrics import METRIC_NAMES
from groupmixnorm.metrics.uncertainty import Interval, mean_interval, paired_comparison

#: The constrained gaps of the benchmark reports and their bounds: thresholded gaps (at the decision
#: threshold, fairlearn's definitions) and the threshold-free KS distance between the groups' scores.
BOUNDS: dict[str, tuple[float, ...]] = {
    "dp_gap_hard": (0.02, 0.05, 0.10), "eodds_gap_hard": (0.02, 0.05, 0.10), "dp_ks": (0.05, 0.10, 0.20),
}
#: Fair Mixup's soft gaps, reported beside them only for comparison with published numbers.
SOFT_BOUNDS: dict[str, tuple[float, ...]] = {"dp_gap": (0.02, 0.05, 0.10), "eodds_gap": (0.02, 0.05, 0.10)}

#: Columns that identify one choice: a method on a data set (and protected attribute) with one seed.
CHOICE_KEYS = ("dataset", "method", "seed")


def validated_runs_table(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per bench record: dataset, method, setting, seed, ``val_*`` and ``test_*`` for every metric of
    :data:`~groupmixnorm.metrics.METRIC_NAMES`, whether the setting needs the attribute at prediction, the
    selected epoch, seconds per epoch and the command."""
    rows = []
    for record in records:
        row: dict[str, Any] = {"dataset": record["dataset"]["name"], "method": record["method"],
                               "setting": record["setting"], "seed": record["seed"]}
        row.update({f"val_{key}": record["val"][key] for key in METRIC_NAMES})
        row.update({f"test_{key}": record[key] for key in METRIC_NAMES})
        row.update(needs_attribute=bool(record.get("uses_sensitive_at_prediction")),
                   selected_epoch=record["selected_epoch"],
                   epoch_seconds=record["timings"]["median_epoch_seconds"], command=record["command"])
        rows.append(row)
    return pd.DataFrame(rows, columns=validated_columns())


def validated_columns() -> list[str]:
    """The columns of :func:`validated_runs_table` (and of the tabular bench's ``runs.csv``), in order."""
    return ["dataset", "method", "setting", "seed", *(f"val_{k}" for k in METRIC_NAMES),
            *(f"test_{k}" for k in METRIC_NAMES), "needs_attribute", "selected_epoch", "epoch_seconds", "command"]


def choose_on_validation(
    runs: pd.DataFrame, *, gap: str, bound: float, score: str = "ap", keys: Sequence[str] = CHOICE_KEYS
) -> pd.DataFrame:
    """For every combination of ``keys``: the run with the best ``val_<score>`` among those whose
    ``val_<gap>`` is at most ``bound``.

    Parameters
    ----------
    runs : pandas.DataFrame
        One row per run, with the ``keys`` columns, ``setting``, ``val_<score>`` and ``val_<gap>``
        (test columns may be present; they are carried along, never read).
    gap : str
        The constrained gap, e.g. ``"dp_gap_hard"`` or ``"dp_ks"``.
    bound : float
        The largest validation gap allowed.
    score : str, default "ap"
        What the choice maximises on validation.
    keys : sequence of str
        The columns of one choice.

    Returns
    -------
    pandas.DataFrame
        One row per combination of ``keys`` with the chosen run's columns and ``feasible`` (False, with
        NaN elsewhere, when no run met the bound on validation). Ties in the score go to the first run
        in ``runs``' order.
    """
    missing = [column for column in (*keys, "setting", f"val_{score}", f"val_{gap}") if column not in runs.columns]
    if missing:
        raise ValueError(f"runs lack the column(s) {missing} needed to choose on validation")
    if not math.isfinite(bound) or bound < 0:
        raise ValueError(f"bound must be a finite number >= 0, got {bound}")
    chosen = []
    for key, candidates in runs.groupby(list(keys), sort=True):
        meeting = candidates[candidates[f"val_{gap}"] <= bound]
        if meeting.empty:
            row = pd.Series(np.nan, index=runs.columns, dtype=object)
            row[list(keys)] = key
            row["feasible"] = False
        else:
            row = meeting.loc[meeting[f"val_{score}"].idxmax()].copy()
            row["feasible"] = True
        chosen.append(row)
    table = pd.DataFrame(chosen).reset_index(drop=True)
    return table.assign(bound=bound, constrained=gap)


def summarize_choices(choices: pd.DataFrame, *, gap: str, score: str = "ap", confidence: float = 0.95) -> pd.DataFrame:
    """Per data set and method: the chosen runs' mean test score and gap with t intervals over seeds.

    A method that missed the bound on any seed is marked infeasible (its means are over the seeds that met
    it, and ``feasible_seeds`` says how many).
    """
    rows = []
    for (dataset, method), group in choices.groupby(["dataset", "method"], sort=True):
        met = group[group["feasible"].astype(bool)]
        rows.append({
            "dataset": dataset, "method": method, "seeds": len(group), "feasible_seeds": len(met),
            f"test_{score}": _mean_interval(met[f"test_{score}"], confidence),
            f"test_{gap}": _mean_interval(met[f"test_{gap}"], confidence),
            "settings": ", ".join(sorted(set(map(str, met["setting"])))),
        })
    return pd.DataFrame(rows)


def compare_to_best_peer(
    choices: pd.DataFrame, *, method: str, peers: Sequence[str], score: str = "ap", confidence: float = 0.95
) -> dict[str, str]:
    """Per data set, ``method`` against its best peer, from a paired comparison over seeds.

    The best peer is the one of best mean test ``score`` among the peers that met the bound on every seed
    ``method`` met it on, so that the comparison covers all of ``method``'s seeds and a peer feasible on one
    lucky seed cannot win it. Verdicts: ``"wins"``, ``"ties"`` or ``"loses against PEER"`` (followed by how
    many seeds ``method`` met the bound on, when not all); ``"infeasible"``
    when ``method`` met the bound on no seed; ``"met on 1 seed only"``; ``"no peer met it on the same seeds"``
    (every peer missed the bound where ``method`` met it).
    """
    verdicts = {}
    for dataset, group in choices.groupby("dataset", sort=True):
        feasible = group[group["feasible"].astype(bool)]
        ours = feasible[feasible["method"] == method].set_index("seed")[f"test_{score}"]
        if len(ours) < 2:
            verdicts[dataset] = "infeasible" if ours.empty else "met on 1 seed only"
            continue
        candidates = {}
        for peer, rows in feasible[feasible["method"].isin(peers)].groupby("method"):
            theirs = rows.set_index("seed")[f"test_{score}"]
            if ours.index.isin(theirs.index).all():
                candidates[peer] = theirs.loc[ours.index]
        if not candidates:
            verdicts[dataset] = f"no peer met it on the same {len(ours)} seeds"
            continue
        best = max(candidates, key=lambda peer: candidates[peer].mean())
        comparison = paired_comparison(ours.to_numpy(float), candidates[best].to_numpy(float), confidence=confidence)
        seeds = int((group["method"] == method).sum())
        partial = f" ({method} met the bound on {len(ours)}/{seeds} seeds)" if len(ours) < seeds else ""
        verdicts[dataset] = f"{comparison.verdict()} against {best}{partial}"
    return verdicts


def _mean_interval(values: pd.Series, confidence: float) -> Interval | None:
    return mean_interval(values.astype(float).to_numpy(), confidence=confidence) if len(values) else None
