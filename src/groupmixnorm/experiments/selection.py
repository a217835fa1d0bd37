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

import numpy as np
import pandas as pd

from groupmixnorm.metrics.uncertainty import Interval, mean_interval, paired_comparison

#: Columns that identify one choice: a method on a data set (and protected attribute) with one seed.
CHOICE_KEYS = ("dataset", "method", "seed")


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
    """Per data set, ``method`` against the peer with the best mean test ``score``: ``"wins"``, ``"ties"`` or
    ``"loses"`` from a paired comparison over the seeds both met the bound on (``"infeasible"`` if the
    method met it on no seed, ``"no feasible peer"`` if no peer did)."""
    verdicts = {}
    for dataset, group in choices.groupby("dataset", sort=True):
        feasible = group[group["feasible"].astype(bool)]
        ours = feasible[feasible["method"] == method].set_index("seed")[f"test_{score}"]
        others = feasible[feasible["method"].isin(peers)]
        if ours.empty:
            verdicts[dataset] = "infeasible"
            continue
        if others.empty:
            verdicts[dataset] = "no feasible peer"
            continue
        best = others.groupby("method")[f"test_{score}"].mean().idxmax()
        theirs = others[others["method"] == best].set_index("seed")[f"test_{score}"]
        seeds = ours.index.intersection(theirs.index)
        if len(seeds) < 2:
            verdicts[dataset] = f"too few shared seeds with {best}"
            continue
        comparison = paired_comparison(ours.loc[seeds].to_numpy(float), theirs.loc[seeds].to_numpy(float),
                                       confidence=confidence)
        verdicts[dataset] = f"{comparison.verdict()} against {best}"
    return verdicts


def _mean_interval(values: pd.Series, confidence: float) -> Interval | None:
    return mean_interval(values.astype(float).to_numpy(), confidence=confidence) if len(values) else None
