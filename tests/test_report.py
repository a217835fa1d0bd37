"""The HTML fairness report: its numbers, its sources, and how it looks in a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from groupmixnorm import cli
from groupmixnorm.experiments.html_report import build_report
from groupmixnorm.experiments.report import FRONT_GAPS

#: Set by .ci/run: there a missing browser fails the browser test instead of skipping it.
REQUIRE_BROWSER = os.environ.get("GROUPMIXNORM_REQUIRE_BROWSER") == "1"
#: Bootstrap resamples of the reports built here: enough for the tables, few enough to be quick.
RESAMPLES = "20"


@pytest.fixture(scope="module")
def run_folder(saved_run):
    return saved_run("gmn", epochs=1, hidden=16)


def _toy_bench(folder, dataset="adult", sensitive="sex"):
    """A bench results folder with runs.csv only (no PNGs, so the report draws the fronts itself), whose runs
    trained on ``dataset`` with the protected attribute ``sensitive`` (as their commands say)."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for method in ("erm", "gmn"):
        for lam in (0, 1, 3):
            for seed in (0, 1):
                metrics = {"accuracy": 0.8, "ap": 0.75 - lam / 20 + rng.normal(0, 0.005),
                           "dp_gap_hard": 0.2 / (1 + lam) + rng.normal(0, 0.005), "eodds_gap_hard": 0.15 / (1 + lam),
                           "dp_ks": 0.25 / (1 + lam), "dp_gap": 0.1, "eodds_gap": 0.1}
                rows.append({"dataset": dataset, "method": method, "setting": f"lam={lam}", "seed": seed,
                             **{f"{split}_{k}": v for split in ("val", "test") for k, v in metrics.items()},
                             "epoch_seconds": 0.1,
                             "command": f"groupmixnorm train --dataset {dataset} --sensitive {sensitive} "
                                        f"--method {method} --seed {seed} --out OUT"})
    pd.DataFrame(rows).to_csv(folder / "runs.csv", index=False)
    return folder


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory):
    return _toy_bench(tmp_path_factory.mktemp("bench") / "toy")


class _Cells(HTMLParser):
    """The rows of cells (th and td text) of the table with one id."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier, self.inside, self.rows, self.cell = identifier, False, [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table" and dict(attrs).get("id") == self.identifier:
            self.inside = True
        elif self.inside and tag == "tr":
            self.rows.append([])
        elif self.inside and tag in ("th", "td"):
            self.cell = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif self.inside and tag in ("th", "td") and self.cell is not None:
            self.rows[-1].append(self.cell.strip())
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def _table(text: str, identifier: str) -> pd.DataFrame:
    """A table of the report as pandas: the header row's names, one row per body row (first cell the index)."""
    parser = _Cells(identifier)
    parser.feed(text)
    header, *rows = [row for row in parser.rows if row]
    frame = pd.DataFrame([row[1:] for row in rows], index=[row[0] for row in rows], columns=header[1:])
    return frame.apply(_numbers)


def _numbers(column: pd.Series) -> pd.Series:
    try:
        return column.astype(float)
    except ValueError:
        return column


def test_checkpoint_report_has_rates_gaps_calibration_and_trade_off(run_folder, bench_folder, tmp_path):
    out = tmp_path / "report.html"
    assert cli.main(["report", str(run_folder / "model.pt"), "--out", str(out), "--bench", str(bench_folder),
                     "--resamples", RESAMPLES]) == 0
    text = out.read_text(encoding="utf-8")
    record = json.loads((run_folder / "metrics.json").read_text())
    rates = _table(text, "group-rates")
    assert list(rates.index) == ["Female", "Male"]
    for group in ("Female", "Male"):  # recomputed from the checkpoint, equal to what train wrote
        for column, header in (("selection_rate", "selection rate"), ("tpr", "true positive rate"),
                               ("fpr", "false positive rate")):
            assert rates.loc[group, header] == pytest.approx(record["group_rates"][group][column], abs=1e-4)
    gaps = _table(text, "gaps")["gap"]
    assert gaps.iloc[0] == pytest.approx(record["dp_gap_hard"], abs=1e-4)
    fpr = [record["group_rates"][g]["fpr"] for g in ("Female", "Male")]
    assert gaps.loc["false positive rate"] == pytest.approx(abs(fpr[0] - fpr[1]), abs=1e-4)
    assert "Calibration by group" in text and "Trade-off: bench toy" in text
    images = re.findall(r"<img [^>]*src='([^']*)'", text)
    # The rates, score histogram, threshold sweep and calibration plots and two trade-off fronts, all embedded.
    assert len(images) == 6 and all(src.startswith("data:image/png;base64,") for src in images)
    assert "http://" not in text and "https://" not in text  # nothing to fetch: self-contained


def test_run_folder_report_uses_the_record_and_the_checkpoint_beside_it(run_folder, tmp_path):
    with_model = build_report(run_folder, resamples=int(RESAMPLES))
    assert "calibration by group" in with_model and "selected epoch" in with_model  # the plot's alt text
    alone = tmp_path / "run"
    alone.mkdir()
    shutil.copy(run_folder / "metrics.json", alone / "metrics.json")
    text = build_report(alone)
    assert "No calibration plot: that needs the test labels and scores" in text and "calibration by group" not in text
    assert list(_table(text, "group-rates").index) == ["Female", "Male"]


def test_bench_folder_report_shows_the_fronts(bench_folder):
    text = build_report(bench_folder)
    assert text.count("data:image/png;base64,") == 2
    best = _table(text, f"best-ap-{FRONT_GAPS[0]}")
    assert list(best.index) == ["erm", "gmn"]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: tmp / "nothing", "no run folder, checkpoint or bench folder"),
    (lambda tmp: tmp, "neither metrics.json"),
])
def test_report_errors_are_one_line(make, message, tmp_path, capsys):
    code = cli.main(["report", str(make(tmp_path)), "--out", str(tmp_path / "r.html")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and message in error
    assert not (tmp_path / "r.html").exists()


RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


@pytest.mark.parametrize("bench, message", [
    (RESULTS / "colored-digits", "trained on colored-digits (protected attribute color)"),
    ("race", "trained on adult (protected attribute race)"),
    ("german", "trained on csv (protected attribute sex)"),
    ("mixed", "do not name one data set"),
])
def test_a_bench_of_other_data_is_refused(bench, message, run_folder, tmp_path, capsys):
    if bench == "race":
        bench = _toy_bench(tmp_path / "race", sensitive="race")
    elif bench == "german":
        bench = _toy_bench(tmp_path / "german", dataset="csv")
    elif bench == "mixed":
        bench = _toy_bench(tmp_path / "mixed")
        runs = pd.read_csv(bench / "runs.csv")
        runs.loc[0, "command"] = "groupmixnorm train --dataset colored-digits --sensitive color --out OUT"
        runs.to_csv(bench / "runs.csv", index=False)
    for source in (run_folder, run_folder / "model.pt"):  # the record's and the checkpoint's data alike
        code = cli.main(["report", str(source), "--out", str(tmp_path / "r.html"), "--bench", str(bench)])
        error = capsys.readouterr().err
        assert code == 2 and error.count("\n") == 1 and message in error
        assert "the run on adult (protected attribute sex)" in error or "do not name" in error
        assert not (tmp_path / "r.html").exists()


def test_the_committed_adult_bench_goes_with_an_adult_run(run_folder):
    text = build_report(run_folder, bench=RESULTS / "tabular" / "adult", resamples=int(RESAMPLES))
    assert "Trade-off: bench adult" in text and "chosen per seed on validation" in text


def test_a_bench_folder_report_refuses_a_second_bench(bench_folder, tmp_path, capsys):
    code = cli.main(["report", str(bench_folder), "--out", str(tmp_path / "r.html"), "--bench", str(bench_folder)])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "--bench" in error


def _browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        reason = "Debian's chromium is not installed (apt-get install -y chromium); the report's browser test needs it"
        if REQUIRE_BROWSER:
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def _headless(browser: str, profile, *arguments: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]
    return subprocess.run([browser, *flags, *arguments], capture_output=True, text=True, timeout=120, check=True)


def test_report_renders_in_a_headless_browser(run_folder, bench_folder, tmp_path):
    from PIL import Image

    browser = _browser()
    out = tmp_path / "report.html"
    assert cli.main(["report", str(run_folder / "model.pt"), "--out", str(out), "--bench", str(bench_folder),
                     "--resamples", RESAMPLES]) == 0
    url = out.resolve().as_uri()
    dom = _headless(browser, tmp_path / "profile-dom", "--dump-dom", url).stdout
    for group in ("Female", "Male"):  # the table rows as the browser parsed them
        assert re.search(rf"<tr>\s*<th>{group}</th>(\s*<td>[0-9.]+</td>){{7}}", dom)
    assert dom.count("<img ") == 6
    screenshot = tmp_path / "report.png"
    _headless(browser, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1200,1600", url)
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=int)
    assert pixels.shape[:2] == (1600, 1200)
    ink = (pixels.sum(axis=2) < 600).mean()  # text, rules and plots: not a blank page
    colored = (pixels.max(axis=2) - pixels.min(axis=2)) > 80  # the bars of the rates plot (blue, orange, green)
    assert ink > 0.02 and colored.sum() > 20_000
    rows, _ = np.nonzero(colored)
    assert rows.min() > 300  # the plot sits below the run facts and metric tables, as laid out
