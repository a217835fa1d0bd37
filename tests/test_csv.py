"""Training on any CSV: typing, splitting, errors, and the train/predict/report commands on a CSV run."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from groupmixnorm import cli
from groupmixnorm.data import load_csv, read_adult_frame
from groupmixnorm.data.csv import CSVError, type_columns
from groupmixnorm.experiments.spec import load_run_data
from groupmixnorm.methods import METHODS


@pytest.fixture(scope="module")
def adult_csv(tmp_path_factory):
    """The bundled Adult training file as an ordinary CSV with a header (missing values left empty)."""
    path = tmp_path_factory.mktemp("csv") / "adult.csv"
    read_adult_frame("train").to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory):
    """1,500 Adult rows plus an identifier column: quick to train on."""
    frame = read_adult_frame("train").dropna().iloc[:1500].reset_index(drop=True)
    path = tmp_path_factory.mktemp("csv") / "small.csv"
    frame.insert(0, "person", np.arange(len(frame)))
    frame.to_csv(path, index=False)
    return path


def test_adult_as_a_csv_is_typed_split_and_stratified(adult_csv):
    data = load_csv(adult_csv, label="income", sensitive="sex")
    assert (len(data.train), len(data.val), len(data.test)) == (16890, 4223, 9049)
    assert "2399 with missing values dropped" in data.protocol and "positive income=>50K" in data.protocol
    assert data.group_names == ["Female", "Male"] and not any(f.startswith("sex") for f in data.feature_names)
    assert "age" in data.feature_names and "workclass_Private" in data.feature_names  # numeric and one-hot
    table = data.describe()
    for column in ("positive_rate", "share_Female"):  # stratified: the same shares in every split
        assert table[column].max() - table[column].min() < 0.002
    assert data.train.X.dtype == np.float32 and abs(data.train.X[:, 0].mean()) < 1e-4  # standardized on train


def test_the_split_follows_the_seed(small_csv):
    first, again = (load_csv(small_csv, label="income", sensitive="sex", drop=["person"]) for _ in range(2))
    other = load_csv(small_csv, label="income", sensitive="sex", drop=["person"], seed=1)
    np.testing.assert_array_equal(first.test.X, again.test.X)
    assert len(first.test) == len(other.test) and not np.array_equal(first.test.y, other.test.y)


def test_columns_are_typed_by_their_values():
    frame = pd.DataFrame({"n": [1, 2], "x": [0.5, 1.5], "flag": [True, False], "s": ["a", "b"]})
    assert type_columns(frame) == (["n", "x"], ["flag", "s"])


@pytest.mark.parametrize("labels, positive, expected", [
    (["no", "yes", "no"], None, [0, 1, 0]),
    ([0, 1, 1], None, [0, 1, 1]),
    ([1, 2, 3], "3", [0, 0, 1]),
    ([1.0, 2.0, 3.0], "2", [0, 1, 0]),
    (["a", "b", "c"], "b", [0, 1, 0]),
])
def test_labels_become_binary(tmp_path, labels, positive, expected):
    path = tmp_path / "t.csv"
    rows = 12
    pd.DataFrame({"y": labels * (rows // 3), "g": ["m", "f"] * (rows // 2), "x": range(rows)}).to_csv(path, index=False)
    data = load_csv(path, label="y", sensitive="g", positive=positive, test_size=0.25, val_fraction=0.25)
    assert sorted(np.concatenate([data.train.y, data.val.y, data.test.y])) == sorted(expected * (rows // 3))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_train_on_a_csv_with_any_method_writes_metrics(small_csv, tmp_path, method):
    out = tmp_path / "run"
    argv = ["train", "--csv", str(small_csv), "--label", "income", "--sensitive", "sex", "--drop", "person",
            "--method", method, "--epochs", "1", "--hidden", "8", "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["dataset"]["name"] == "csv" and record["dataset"]["group_names"] == ["Female", "Male"]
    assert sum(record["dataset"]["rows"].values()) == 1500 and 0 <= record["dp_gap"] <= 1
    assert "--csv" in record["command"] and "--drop person" in record["command"]


def test_a_csv_run_is_saved_and_predicts_exports_and_reports(small_csv, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--csv", str(small_csv), "--label", "income", "--sensitive", "sex", "--drop", "person",
            "--epochs", "1", "--hidden", "8", "--out", str(run), "--save", str(run / "model.pt")]
    assert cli.main(argv) == 0
    assert "positive income=>50K" in capsys.readouterr().out
    rows = pd.read_csv(small_csv).drop(columns=["sex", "income"]).iloc[:20]
    rows.to_csv(tmp_path / "new.csv", index=False)
    assert cli.main(["predict", "--checkpoint", str(run / "model.pt"), "--csv", str(tmp_path / "new.csv"),
                     "--out", str(tmp_path / "scores.csv"), "--id-column", "person"]) == 0
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert list(scores.columns) == ["person", "score", "prediction"] and len(scores) == 20
    assert cli.main(["report", str(run), "--out", str(tmp_path / "report.html")]) == 0
    assert "Calibration by group" in (tmp_path / "report.html").read_text()
    record = json.loads((run / "metrics.json").read_text())
    assert len(load_run_data(record["spec"]).test) == 450  # the spec finds the file again (absolute path)


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize("extra, make, message", [
    ([], lambda tmp, good: tmp / "missing.csv", "no CSV file at"),
    ([], lambda tmp, good: _write(tmp / "empty.csv", ""), "is empty"),
    ([], lambda tmp, good: _write(tmp / "header.csv", "a,b,c\n"), "has a header but no rows"),
    (["--drop", "nope"], lambda tmp, good: good, "unknown drop column 'nope'"),
    (["--positive", "maybe"], lambda tmp, good: good, "positive class 'maybe' is not a value of label column 'y'"),
    (["--strict"], lambda tmp, good: good, "2 row(s)"),
    ([], lambda tmp, good: _write(tmp / "multi.csv", "y,g,x\n" + "a,m,1\nb,f,2\nc,m,3\n" * 4),
     "label column 'y' is not binary: it has 3 distinct value(s) ('a', 'b', 'c'); name the positive class"),
    ([], lambda tmp, good: _write(tmp / "one.csv", "y,g,x\n" + "0,m,1\n1,m,2\n" * 4),
     "sensitive column 'g' has one value ('m')"),
])
def test_csv_errors_are_one_line_with_exit_code_2(tmp_path, capsys, extra, make, message):
    good = _write(tmp_path / "good.csv", "y,g,x,z\n" + "0,m,1,a\n1,f,2,b\n0,f,3,a\n1,m,4,b\n" * 5 + "1,f,,a\n0,m,5,\n")
    argv = ["train", "--csv", str(make(tmp_path, good)), "--label", "y", "--sensitive", "g", *extra, "--epochs", "1",
            "--quiet", "--out", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error and "Traceback" not in error
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("argv, message", [
    (["--csv", "x.csv", "--sensitive", "g"], "needs --label COLUMN"),
    (["--csv", "x.csv", "--label", "y"], "needs --sensitive COLUMN"),
    (["--csv", "x.csv", "--label", "y", "--sensitive", "g", "--dataset", "adult"], "does not combine with --dataset"),
    (["--label", "y"], "--label does not apply to --dataset adult"),
])
def test_csv_flags_are_checked(tmp_path, capsys, argv, message):
    assert cli.main(["train", *argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_missing_values_are_dropped_with_a_count_or_refused(tmp_path):
    path = _write(tmp_path / "t.csv", "y,g,x\n" + "0,m,1\n1,f,2\n0,f,3\n1,m,4\n" * 5 + "1,,7\n0,m,\n")
    assert "2 with missing values dropped" in load_csv(path, label="y", sensitive="g").protocol
    with pytest.raises(CSVError, match=r"2 row\(s\) .* have missing values \(in x, g\)"):
        load_csv(path, label="y", sensitive="g", strict=True)
