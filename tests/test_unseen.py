"""Fairness toward attributes and groups not seen in training: the adult-unseen bench."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from groupmixnorm import cli
from groupmixnorm.data import load_dataset, read_adult_frame
from groupmixnorm.experiments import unseen


def test_age_buckets_and_the_intersection_groups():
    buckets = unseen._age_buckets(pd.Series([17, 24, 25, 44, 45, 64, 65, 90]))
    assert list(buckets) == [0, 0, 1, 1, 2, 2, 3, 3]
    data = load_dataset("adult", sensitive="sex*race")
    test = read_adult_frame("test")
    names = np.array(data.group_names)[data.test.a]
    assert list(names[:20]) == list(test["sex"].head(20) + " & " + test["race"].head(20))
    assert not any(name.startswith(("sex_", "race_")) for name in data.feature_names)


def test_quick_unseen_bench_reports_every_scenario_and_reuses_records(tmp_path, monkeypatch):
    assert cli.main(["bench", "adult-unseen", "--quick", "--quiet", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "adult-unseen.md").read_text()
    for heading in ("## other-attributes", "## held-out-races", "## intersectional"):
        assert heading in text
    for attribute in ("race (unseen)", "age bucket (unseen)", "race, all 5 groups (2 unseen)", "sex*race (trained)"):
        assert f"| {attribute} | gmn |" in text
    records = sorted((tmp_path / "adult-unseen" / "records").glob("*.json"))
    assert len(records) == len(unseen.SCENARIOS) * len(unseen.METHODS)
    record = json.loads(records[0].read_text())
    assert 0 <= record["gaps"][next(iter(record["gaps"]))]["dp_gap"] <= 1

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(unseen, "train", no_training)
    assert cli.main(["bench", "adult-unseen", "--quick", "--quiet", "--results-dir", str(tmp_path)]) == 0
