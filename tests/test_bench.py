"""The bench: quick grid end to end, resumability, and the tables made from records."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from groupmixnorm import cli
from groupmixnorm.experiments import bench, report


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    assert cli.main(["bench", "adult", "--quick", "--quiet", "--results-dir", str(results)]) == 0
    return results


def test_quick_bench_writes_runs_csv_report_and_plots(quick_bench):
    plan = bench.adult_plan(quick=True)
    runs = pd.read_csv(quick_bench / "adult" / "runs.csv")
    assert list(runs.columns) == list(bench.RUN_COLUMNS)
    assert len(runs) == len(plan.specs())
    assert set(runs["method"]) == {"erm", "gapreg", "adversarial", "fairmixup", "gmn", "expgrad"}
    assert runs["accuracy"].gt(0.6).all() and runs["ap"].gt(0.3).all()  # 2 short epochs: a smoke test
    assert runs.loc[runs["method"] == "erm", "accuracy"].iloc[0] > 0.8
    assert runs["command"].str.startswith("groupmixnorm train --dataset adult").all()
    report_text = (quick_bench / "adult.md").read_text()
    assert "groupmixnorm bench adult --quick" in report_text
    assert "| gmn |" in report_text and "### dp_gap" in report_text
    assert "## Time per epoch relative to ERM, measured side by side" in report_text
    timing = json.loads((quick_bench / "adult" / "epoch_time.json").read_text())["table"]
    assert timing["setting"][0] == "erm default" and timing["x_reference"][0] == 1.0
    assert len(timing["setting"]) == len(bench.adult_plan(quick=True).timed)
    for gap in report.FRONT_GAPS:
        image = quick_bench / "adult" / f"ap_vs_{gap}.png"
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"adult/ap_vs_{gap}.png" in report_text


def test_a_row_command_reproduces_its_row(quick_bench, tmp_path):
    runs = pd.read_csv(quick_bench / "adult" / "runs.csv")
    row = runs[runs["method"] == "gapreg"].iloc[0]
    words = row["command"].split()[1:]
    words[words.index("--out") + 1] = str(tmp_path)
    assert cli.main([*words, "--quiet"]) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    for metric in ("accuracy", "ap", "dp_gap", "eodds_gap"):
        assert record[metric] == pytest.approx(row[metric], abs=1e-9)


def test_second_run_reuses_every_record(quick_bench, monkeypatch):
    def no_training(spec):
        raise AssertionError(f"{spec.key()} was trained again")

    monkeypatch.setattr(bench, "execute", no_training)
    before = {p.name: p.stat().st_mtime_ns for p in (quick_bench / "adult" / "records").iterdir()}
    assert cli.main(["bench", "adult", "--quick", "--quiet", "--results-dir", str(quick_bench)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (quick_bench / "adult" / "records").iterdir()}
    assert before == after


def test_a_damaged_record_is_recomputed(tmp_path):
    plan = bench.adult_plan(quick=True)
    spec = plan.specs()[0]
    store = bench.RecordStore(tmp_path)
    store.path(spec).parent.mkdir(parents=True, exist_ok=True)
    store.path(spec).write_text('{"accuracy": 0.9')  # truncated by hand
    assert store.load(spec) is None
    store.path(spec).write_text(json.dumps({"spec": {"method": "other"}}))
    assert store.load(spec) is None


def _summary_rows(points):
    runs = pd.DataFrame(
        [{"method": m, "setting": s, "seed": seed, "accuracy": 0.8, "ap": ap, "dp_gap": gap, "eodds_gap": gap,
          "dp_gap_hard": gap, "eodds_gap_hard": gap, "epoch_seconds": t} for m, s, seed, ap, gap, t in points]
    )
    return report.summarize(runs)


def test_summary_means_and_time_relative_to_erm():
    summary = _summary_rows([
        ("erm", "default", 0, 0.80, 0.20, 1.0), ("erm", "default", 1, 0.78, 0.18, 1.0),
        ("gmn", "a", 0, 0.76, 0.04, 1.2), ("gmn", "a", 1, 0.74, 0.06, 1.2),
    ])
    gmn = summary[summary["method"] == "gmn"].iloc[0]
    assert gmn["ap_mean"] == pytest.approx(0.75)
    assert gmn["dp_gap_mean"] == pytest.approx(0.05)
    assert gmn["seeds"] == 2
    assert gmn["time_vs_erm"] == pytest.approx(1.2)


def test_pareto_front_and_best_ap_under_a_bound():
    summary = _summary_rows([
        ("m", "a", 0, 0.80, 0.20, 1.0), ("m", "b", 0, 0.70, 0.05, 1.0), ("m", "c", 0, 0.60, 0.10, 1.0),
        ("m", "d", 0, 0.75, 0.01, 1.0),
    ])
    front = report.pareto_front(summary, "dp_gap")
    assert list(front["setting"]) == ["d", "a"]  # b and c are beaten by d on both axes
    table = report.best_ap_under(summary, "dp_gap", thresholds=(0.005, 0.05, 0.5))
    assert table.iloc[0]["<= 0.005"] == ""
    assert table.iloc[0]["<= 0.05"].startswith("0.7500 (d)")
    assert table.iloc[0]["<= 0.5"].startswith("0.8000 (a)")


def test_goal_check_names_the_peers_that_beat_gmn_and_skips_attribute_users():
    summary = _summary_rows([
        ("erm", "default", 0, 0.80, 0.20, 1.0),
        ("gmn", "a", 0, 0.78, 0.04, 1.0), ("gmn", "b", 0, 0.79, 0.01, 1.0),
        ("gapreg", "x", 0, 0.77, 0.04, 1.0), ("fairmixup", "y", 0, 0.785, 0.015, 1.0),
    ])
    summary.attrs["needs_attribute"] = [("gmn", "b")]
    lines = report.goal_check(summary, thresholds=(0.02, 0.05))
    assert "dp_gap <= 0.02: no gmn setting reaches the bound." in lines[0]
    assert lines[1].endswith("best gmn AP 0.7800, is beaten by fairmixup (0.7850).")  # gapreg 0.77 is not
    assert lines[-1].endswith("0.975 x ERM's AP (goal: >= 0.95).")
