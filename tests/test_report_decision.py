"""The report's view of the decision: intervals, the four-fifths view, the majority class, the threshold,
a baseline beside the model, the search's front, and warnings about small groups."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from groupmixnorm import cli
from groupmixnorm.experiments.constraint import THRESHOLDS, ThresholdChoice, Trial, front_table
from groupmixnorm.experiments.html_report import build_report
from groupmixnorm.experiments.report_decision import FOUR_FIFTHS, small_group_lines
from groupmixnorm.metrics import accuracy, dp_gap_hard, fairness_report, group_rates
from groupmixnorm.metrics.uncertainty import MIN_GROUP_ROWS, bootstrap_interval, bootstrap_intervals
from test_report import _table  # the report's tables as pandas

RESAMPLES = 20  # enough for the intervals to be intervals, few enough to be quick
INTERVAL = re.compile(r"^(?:(\S+) )?\[(\S+), (\S+)\]$")  # "estimate [low, high]" or "[low, high]"


@pytest.fixture(scope="module")
def run_folder(saved_run):
    return saved_run("gmn", epochs=1, hidden=16)


@pytest.fixture(scope="module")
def erm_folder(saved_run):
    return saved_run("erm", epochs=1, hidden=16)


@pytest.fixture(scope="module")
def report(run_folder):
    return build_report(run_folder / "model.pt", resamples=RESAMPLES)


def _ends(cell: str) -> tuple[float | None, float, float]:
    estimate, low, high = INTERVAL.match(cell).groups()
    return (None if estimate is None else float(estimate)), float(low), float(high)


def _test_split(checkpoint_path):
    """The checkpoint's test labels, scores and group names, scored here as the report scores them."""
    from groupmixnorm.training.checkpoint import load_checkpoint
    from groupmixnorm.training.loop import evaluate, to_tensors

    checkpoint = load_checkpoint(checkpoint_path)
    data = checkpoint.run_data()
    _, scores = evaluate(checkpoint.method, checkpoint.model, to_tensors(data.test, torch.device("cpu")))
    return data, scores, np.asarray(data.group_names, dtype=object)[data.test.a]


def test_every_rate_and_gap_has_an_interval_around_its_estimate(report):
    rates, cells = _table(report, "group-rates"), _table(report, "rate-intervals")
    assert list(cells.index) == list(rates.index) == ["Female", "Male"]
    for group in cells.index:
        for header in ("selection rate", "true positive rate", "false positive rate", "accuracy", "mean score"):
            estimate, low, high = _ends(cells.loc[group, header])
            assert low <= estimate <= high  # a rate's percentile interval holds it
            assert estimate == pytest.approx(rates.loc[group, header], abs=1e-4)  # the table's number
    gaps = _table(report, "gaps")
    assert len(gaps) == 10 and gaps["95% interval"].str.match(INTERVAL).all()
    for gap, cell in zip(gaps["gap"], gaps["95% interval"]):
        _, low, high = _ends(cell)
        assert 0.0 <= low <= high <= 2.0 and not np.isnan(gap)  # summed gaps (eodds_gap) can exceed 1
    metrics = _table(report, "metrics")
    _, low, high = _ends(metrics.loc["accuracy", "95% interval"])
    assert low <= metrics.loc["accuracy", "model"] <= high
    assert f"{RESAMPLES} resamples" in report


def test_the_four_fifths_view_divides_by_the_highest_rate(report, run_folder):
    record = json.loads((run_folder / "metrics.json").read_text())
    ratios = _table(report, "ratios")
    selected = {group: record["group_rates"][group]["selection_rate"] for group in ("Female", "Male")}
    top = max(selected, key=selected.get)
    assert ratios.loc[top, "ratio to the highest"] == 1.0
    assert ratios["ratio to the highest"].min() == pytest.approx(record["dp_ratio"], abs=1e-4)
    for group, row in ratios.iterrows():
        assert row["ratio to the highest"] == pytest.approx(selected[group] / selected[top], abs=1e-4)
        assert (row["four-fifths rule"] == "below 0.8") == (row["ratio to the highest"] < FOUR_FIFTHS)


def test_majority_accuracy_and_the_threshold_sweep(report, run_folder):
    data, scores, groups = _test_split(run_folder / "model.pt")
    base = float(np.mean(data.test.y))
    metrics = _table(report, "metrics")
    assert metrics.loc["majority-class accuracy", "model"] == pytest.approx(max(base, 1 - base), abs=1e-4)
    assert list(metrics.index[:2]) == ["accuracy", "majority-class accuracy"]  # side by side
    sweep = _table(report, "threshold-sweep")
    assert [float(t) for t in sweep.index] == pytest.approx(list(THRESHOLDS))
    assert THRESHOLDS[0] == 0.05 and THRESHOLDS[-1] == 0.95
    at = {float(t): row for t, row in sweep.iterrows()}
    assert at[0.5]["accuracy"] == pytest.approx(metrics.loc["accuracy", "model"], abs=1e-4)
    expected = fairness_report(data.test.y, scores, groups, 0.3)
    assert at[0.3]["dp_gap_hard"] == pytest.approx(expected["dp_gap_hard"], abs=1e-4)
    assert at[0.3]["eodds_gap_hard"] == pytest.approx(expected["eodds_gap_hard"], abs=1e-4)
    for alt in ("score histograms by group", "threshold sweep"):
        assert f"<img alt='{alt}' src='data:image/png;base64," in report


def test_intervals_drawn_together_equal_those_drawn_one_by_one():
    rng = np.random.default_rng(0)
    y, scores, groups = rng.integers(0, 2, 300), rng.random(300), rng.integers(0, 3, 300)
    gap, acc = (lambda a, s, g: dp_gap_hard(s, g)), (lambda a, s, g: accuracy(a, s))
    together = bootstrap_intervals(lambda a, s, g: [gap(a, s, g), acc(a, s, g)], y, scores, groups,
                                   resamples=50, seed=3)
    assert together == [bootstrap_interval(m, y, scores, groups, resamples=50, seed=3) for m in (gap, acc)]


# ------------------------------------------------------------------------------------------------ baseline


def test_a_baseline_adds_a_second_column(run_folder, erm_folder, tmp_path):
    out = tmp_path / "report.html"
    assert cli.main(["report", str(run_folder / "model.pt"), "--out", str(out), "--baseline", str(erm_folder),
                     "--resamples", str(RESAMPLES)]) == 0
    text = out.read_text(encoding="utf-8")
    erm = json.loads((erm_folder / "metrics.json").read_text())
    metrics, gaps = _table(text, "metrics"), _table(text, "gaps")
    column = "baseline (erm)"
    for key in ("accuracy", "ap", "dp_gap_hard", "eodds_gap"):
        assert metrics.loc[key, column] == pytest.approx(erm[key], abs=1e-4)
    assert metrics.loc["majority-class accuracy", column] == metrics.loc["majority-class accuracy", "model"]
    assert gaps.iloc[0][column] == pytest.approx(erm["dp_gap_hard"], abs=1e-4)
    fpr = [erm["group_rates"][g]["fpr"] for g in ("Female", "Male")]
    assert gaps.loc["false positive rate", column] == pytest.approx(abs(fpr[0] - fpr[1]), abs=1e-4)


def _other_data(erm_folder, folder):
    folder.mkdir()
    record = json.loads((erm_folder / "metrics.json").read_text())
    record["dataset"]["sensitive"] = "race"
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


@pytest.mark.parametrize("baseline, message", [
    (lambda erm, tmp: tmp / "missing", "--baseline {path}: no checkpoint or run folder there"),
    (lambda erm, tmp: _other_data(erm, tmp / "race"), "--baseline {path} was tested on other data"),
])
def test_a_bad_baseline_is_a_one_line_error(baseline, message, run_folder, erm_folder, tmp_path, capsys):
    path = baseline(erm_folder, tmp_path)
    code = cli.main(["report", str(run_folder), "--out", str(tmp_path / "r.html"), "--baseline", str(path)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and message.format(path=path) in error
    assert not (tmp_path / "r.html").exists()


# ---------------------------------------------------------------------------------------------- the search


THRESHOLD = 0.4  # the fake search's choice, not the default 0.5


@pytest.fixture(scope="module")
def search_folder(run_folder, tmp_path_factory):
    """What train --max-gap --save leaves, built around the saved gmn model (at threshold 0.4) without
    searching: its checkpoint, front.csv of two trials (written by the search's own code) and metrics.json."""
    folder = tmp_path_factory.mktemp("search")
    payload = torch.load(run_folder / "model.pt", weights_only=False)
    payload["threshold"] = THRESHOLD
    torch.save(payload, folder / "model.pt")
    data, scores, groups = _test_split(folder / "model.pt")
    bounds = {"dp_gap_hard": 0.2}
    chosen = Trial("gmn", "align", 1.0, ThresholdChoice(THRESHOLD, 0.7, 0.8, {"dp_gap_hard": 0.05},
                                                        {"dp_gap_hard": 0.08}, 0.001, 0.6, True), 1.0, {"align": 1.0})
    missed = Trial("erm", None, None, ThresholdChoice(0.5, 0.72, 0.82, {"dp_gap_hard": 0.3},
                                                      {"dp_gap_hard": 0.34}, 0.001, 0.6, False), 1.0)
    front_table([missed, chosen], bounds, chosen).to_csv(folder / "front.csv", index=False)
    record = {
        "chosen": {"method": "gmn", "knob": "align", "value": 1.0, "options": {"align": 1.0}, "threshold": THRESHOLD,
                   "command": "groupmixnorm train ..."},
        "bounds": bounds, "select": "ap", "trials": 2, "feasible_trials": 1,
        "test": {"metrics": fairness_report(data.test.y, scores, groups, THRESHOLD)},
        "dataset": {"name": "adult", "sensitive": "sex", "group_names": list(data.group_names),
                    "rows": {"train": len(data.train), "val": len(data.val), "test": len(data.test)}},
        "warnings": [], "checkpoint": str(folder / "model.pt"),
    }
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder, group_rates(data.test.y, scores, groups, THRESHOLD)


def _front(text: str) -> pd.DataFrame:
    assert "Validation front of the search" in text
    assert "<img alt='validation front with the chosen trial' src='data:image/png;base64," in text
    return _table(text, "front")


@pytest.mark.parametrize("name", ["", "model.pt"])  # the search's run folder, and its checkpoint
def test_a_searched_model_shows_its_front_and_its_threshold(name, search_folder):
    folder, expected = search_folder
    text = build_report(folder / name, resamples=RESAMPLES)
    front = _front(text)
    assert list(front["method"]) == ["erm", "gmn"] and list(front["chosen"]) == ["", "✔ chosen"]
    assert f"score &ge; {THRESHOLD:g}" in text
    assert f"<th>decision threshold</th><td class='text'>{THRESHOLD:g}</td>" in text
    rates = _table(text, "group-rates")
    for group in ("Female", "Male"):  # decided at the checkpoint's threshold, not at 0.5
        assert rates.loc[group, "selection rate"] == pytest.approx(expected.loc[group, "selection_rate"], abs=1e-4)


def test_a_search_folder_without_its_checkpoint_still_reports(search_folder, tmp_path):
    folder, _ = search_folder
    record = json.loads((folder / "metrics.json").read_text())
    record["checkpoint"] = str(tmp_path / "moved.pt")
    (tmp_path / "metrics.json").write_text(json.dumps(record))
    shutil.copy(folder / "front.csv", tmp_path / "front.csv")
    text = build_report(tmp_path)
    _front(text)
    assert float(_table(text, "metrics").loc["dp_gap_hard", "model"]) == pytest.approx(
        record["test"]["metrics"]["dp_gap_hard"], abs=1e-4)
    for line in ("No per-group rates:", "No score histograms: that needs the test labels and scores",
                 "No threshold sweep:", "No calibration plot:", "No majority-class accuracy:"):
        assert text.count(line) == 1


def test_a_checkpoint_beside_another_search_gets_a_note(run_folder, search_folder, tmp_path):
    folder, _ = search_folder
    for name in ("metrics.json", "front.csv"):
        shutil.copy(folder / name, tmp_path / name)
    shutil.copy(run_folder / "model.pt", tmp_path / "other.pt")  # threshold 0.5: not the search's choice
    text = build_report(tmp_path / "other.pt", resamples=RESAMPLES)
    assert "Validation front of the search" not in text and "so its front is not shown" in text


# ----------------------------------------------------------------------------------------------- small groups


def test_small_group_lines_follow_the_package_rule():
    sizes = pd.Series({"few": MIN_GROUP_ROWS - 1, "enough": MIN_GROUP_ROWS})
    lines = small_group_lines(sizes)
    assert len(lines) == 1 and "'few'" in lines[0] and f"{MIN_GROUP_ROWS - 1} test rows" in lines[0]
    assert small_group_lines(pd.Series({"a": MIN_GROUP_ROWS, "b": 10 * MIN_GROUP_ROWS})) == []


def test_a_csv_run_with_a_tiny_group_warns_about_it(tmp_path):
    rng = np.random.default_rng(0)
    groups = np.array(["big"] * 440 + ["rare"] * 60)
    x = rng.normal(size=500)
    label = np.concatenate([(x[:440] + rng.normal(size=440) > 0), np.arange(60) % 2 == 0]).astype(int)
    pd.DataFrame({"x": x, "z": rng.normal(size=500), "grp": groups, "y": label}).to_csv(tmp_path / "t.csv", index=False)
    out = tmp_path / "run"
    assert cli.main(["train", "--csv", str(tmp_path / "t.csv"), "--label", "y", "--sensitive", "grp", "--method",
                     "erm", "--epochs", "1", "--hidden", "8", "--quiet", "--out", str(out), "--save",
                     str(out / "model.pt")]) == 0
    text = build_report(out, resamples=RESAMPLES)
    rows = _table(text, "group-rates")["rows"]
    assert rows["rare"] < MIN_GROUP_ROWS <= rows["big"]
    assert text.count("class='warning'>&#9888; Group ") == 1
    assert f"Group &#x27;rare&#x27; has only {int(rows['rare'])} test rows" in text
