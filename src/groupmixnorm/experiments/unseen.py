"""Fairness toward attributes and groups that training never saw (Adult, official split).

Three scenarios, each run for several methods and seeds:

``other-attributes``
    Train with ``sex`` as the protected attribute; measure the gaps by ``race`` and by age bucket too.
``held-out-races``
    Train with ``race`` as the protected attribute on the rows of three races only; measure the gaps over
    all five races of the test split, two of which training never saw.
``intersectional``
    Train with the ten ``sex*race`` groups; measure the gaps over those groups.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from groupmixnorm.data import Split, load_dataset, read_adult_frame
from groupmixnorm.data.adult import SENSITIVE_GROUPS
from groupmixnorm.data.tabular import encode_groups
from groupmixnorm.methods import make_method
from groupmixnorm.metrics import fairness_report
from groupmixnorm.training import TrainConfig, train
from groupmixnorm.files import JsonStore, write_text_atomic

SCENARIOS = ("other-attributes", "held-out-races", "intersectional")
METHODS: dict[str, dict[str, Any]] = {
    "erm": {}, "gapreg": {"lam": 0.5}, "fairmixup": {"lam": 0.5}, "gmn": {},
}
SEEN_RACES = ("Asian-Pac-Islander", "Black", "White")
AGE_BUCKETS = (0, 25, 45, 65, np.inf)
AGE_NAMES = ["<25", "25-44", "45-64", "65+"]


def run_unseen(
    root: Path, *, seeds: int = 5, epochs: int = 10, on_run: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """Every scenario x method x seed; one JSON record each under ``root``, reused when present."""
    store = JsonStore(root)
    records = []
    for scenario in SCENARIOS:
        for seed in range(seeds):
            for method, options in METHODS.items():
                config = TrainConfig(epochs=epochs, seed=seed)
                records.append(store.reuse_or_make(
                    f"{scenario}-{method}-s{seed}-e{epochs}",
                    lambda: {**_run(scenario, method, options, config), "epochs": epochs}))
                if on_run:
                    on_run(f"{scenario} {method} seed {seed}")
    return records


def _run(scenario: str, method: str, options: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    started = time.perf_counter()
    sensitive = {"other-attributes": "sex", "held-out-races": "race", "intersectional": "sex*race"}[scenario]
    data = load_dataset("adult", sensitive=sensitive)
    if scenario == "held-out-races":
        seen = [SENSITIVE_GROUPS["race"].index(name) for name in SEEN_RACES]
        data = dataclasses.replace(data, train=_only(data.train, seen), val=_only(data.val, seen))
    result = train(make_method(method, **options), data, config)
    y, scores = data.test.y, result.test_scores
    gaps = {f"{sensitive} (trained)": fairness_report(y, scores, data.test.a)}
    if scenario == "held-out-races":
        seen_rows = np.isin(data.test.a, seen)
        gaps = {"race, 3 seen groups": fairness_report(y[seen_rows], scores[seen_rows], data.test.a[seen_rows]),
                "race, all 5 groups (2 unseen)": gaps["race (trained)"]}
    if scenario == "other-attributes":
        test = read_adult_frame("test")  # the official test file, in the loader's row order
        gaps["race (unseen)"] = fairness_report(y, scores, encode_groups(test["race"], SENSITIVE_GROUPS["race"]))
        gaps["age bucket (unseen)"] = fairness_report(y, scores, _age_buckets(test["age"]))
    return {
        "scenario": scenario, "method": method, "options": options, "seed": config.seed,
        "accuracy": result.metrics["accuracy"], "ap": result.metrics["ap"],
        "gaps": {name: {k: report[k] for k in ("dp_gap", "eodds_gap")} for name, report in gaps.items()},
        "seconds": time.perf_counter() - started,
        "command": "groupmixnorm bench adult-unseen",  # the scenarios are not single train commands
    }


def _only(split: Split, groups: list[int]) -> Split:
    keep = np.isin(split.a, groups)
    return Split(split.X[keep], split.y[keep], split.a[keep])


def _age_buckets(age: pd.Series) -> np.ndarray:
    return pd.cut(age, AGE_BUCKETS, right=False, labels=False).to_numpy(dtype=np.int64)


def write_unseen_report(records: list[dict[str, Any]], path: Path, command: str) -> Path:
    """``adult-unseen.md``: per scenario, mean ± std over seeds of AP and the gaps by each attribute."""
    from groupmixnorm.experiments.report import markdown_table, plus_minus

    rows = []
    for record in records:
        for attribute, gaps in record["gaps"].items():
            rows.append({"scenario": record["scenario"], "method": record["method"], "seed": record["seed"],
                         "ap": record["ap"], "attribute": attribute, **gaps})
    frame = pd.DataFrame(rows)
    sections = [
        "# Fairness toward attributes and groups not seen in training (Adult)",
        "",
        f"Generated by `{command}` (official split, {records[0].get('epochs', 10) if records else 10} epochs, "
        "`groupmixnorm train` defaults otherwise; "
        f"gapreg and fairmixup with lam 0.5; gmn with its default). Gaps are the soft gaps, the largest "
        f"difference between any two groups of the attribute. Age buckets: {', '.join(AGE_NAMES)}. "
        f"Held-out races: training keeps only {', '.join(SEEN_RACES)}; the test split has all five.",
        "",
    ]
    for scenario in SCENARIOS:
        part = frame[frame["scenario"] == scenario]
        if part.empty:
            continue
        grouped = part.groupby(["attribute", "method"], sort=False)
        table = grouped.agg(seeds=("seed", "nunique"), ap=("ap", "mean"), ap_std=("ap", "std"),
                            dp=("dp_gap", "mean"), dp_std=("dp_gap", "std"),
                            eodds=("eodds_gap", "mean"), eodds_std=("eodds_gap", "std")).reset_index()
        shown = pd.DataFrame({
            "gaps by": table["attribute"], "method": table["method"], "seeds": table["seeds"],
            "AP": plus_minus(table["ap"], table["ap_std"]),
            "dp_gap": plus_minus(table["dp"], table["dp_std"]),
            "eodds_gap": plus_minus(table["eodds"], table["eodds_std"]),
        })
        sections += [f"## {scenario}", "", markdown_table(shown), ""]
    return write_text_atomic(path, "\n".join(sections))
