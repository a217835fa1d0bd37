"""What a checkpoint accepts: rows it can score (never a blank score), a threshold in [0, 1], and the data
file it was trained on (checked by sha256 and row count when `report` or `analyze` reload it)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from groupmixnorm import cli
from groupmixnorm.data import read_adult_frame
from groupmixnorm.experiments.spec import DataChangedError, load_run_data
from groupmixnorm.training.checkpoint import FORMAT_VERSION, CheckpointError, FilledCategoriesWarning, load_checkpoint


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory):
    """A CSV of 600 Adult rows (with an identifier column) and a one-epoch run on it, saved."""
    folder = tmp_path_factory.mktemp("inputs")
    frame = read_adult_frame("train").dropna().iloc[:600].reset_index(drop=True)
    frame.insert(0, "person", np.arange(len(frame)))
    frame.to_csv(folder / "train.csv", index=False)
    run = folder / "run"
    argv = ["train", "--csv", str(folder / "train.csv"), "--label", "income", "--sensitive", "sex", "--drop", "person",
            "--epochs", "1", "--hidden", "8", "--quiet", "--out", str(run), "--save", str(run / "model.pt")]
    assert cli.main(argv) == 0
    return folder / "train.csv", run


@pytest.fixture()
def training_file(csv_run):
    """The training CSV; whatever a test does to it is undone afterwards."""
    path = csv_run[0]
    original = path.read_bytes()
    yield path
    path.write_bytes(original)


@pytest.fixture(scope="module")
def new_rows(csv_run):
    """Eight rows to score, as a frame with the training columns but no label or protected attribute."""
    return pd.read_csv(csv_run[0]).drop(columns=["sex", "income"]).iloc[:8].reset_index(drop=True)


def _predict(run, rows: pd.DataFrame, tmp_path, *extra: str) -> int:
    rows.to_csv(tmp_path / "new.csv", index=False)
    return cli.main(["predict", "--checkpoint", str(run / "model.pt"), "--csv", str(tmp_path / "new.csv"),
                     "--out", str(tmp_path / "scores.csv"), *extra])


def _one_line_error(capsys) -> str:
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    return error


# ----------------------------------------------------------------------------------- rows that cannot be scored


def test_predict_refuses_rows_with_missing_values_naming_rows_and_columns(csv_run, new_rows, tmp_path, capsys):
    rows = new_rows.copy()
    rows.loc[2, "age"] = np.nan  # an empty numeric cell in data row 3
    rows.loc[4, "workclass"] = np.nan  # a missing category in data row 5
    rows.loc[4, "hours-per-week"] = np.nan
    assert _predict(csv_run[1], rows, tmp_path) == 2
    error = _one_line_error(capsys)
    assert "2 of 8 rows" in error and "counted from 1" in error
    assert "row 3: 'age' is missing" in error
    assert "row 5: 'workclass' is missing, 'hours-per-week' is missing" in error
    assert not (tmp_path / "scores.csv").exists()


def test_predict_names_the_column_row_and_value_of_text_in_a_numeric_column(csv_run, new_rows, tmp_path, capsys):
    rows = new_rows.astype({"hours-per-week": object})
    rows.loc[1, "hours-per-week"] = "twelve"
    assert _predict(csv_run[1], rows, tmp_path) == 2
    assert "row 2: 'hours-per-week' is 'twelve', not a number" in _one_line_error(capsys)


def test_predict_refuses_an_infinite_value(csv_run, new_rows, tmp_path, capsys):
    rows = new_rows.astype({"capital-gain": float})
    rows.loc[6, "capital-gain"] = np.inf
    assert _predict(csv_run[1], rows, tmp_path) == 2
    assert "1 of 8 rows" in (error := _one_line_error(capsys)) and "row 7: 'capital-gain' is inf, not finite" in error


def test_many_bad_rows_are_counted_and_only_the_first_shown(csv_run, new_rows, tmp_path, capsys):
    rows = new_rows.copy()
    rows["age"] = np.nan
    assert _predict(csv_run[1], rows, tmp_path) == 2
    error = _one_line_error(capsys)
    assert "8 of 8 rows" in error and "row 5: 'age' is missing" in error and "row 6" not in error
    assert "3 more row(s)" in error


def test_the_python_api_refuses_the_same_rows(csv_run, new_rows):
    checkpoint = load_checkpoint(csv_run[1] / "model.pt")
    rows = new_rows.copy()
    rows.loc[0, "education"] = None
    with pytest.raises(ValueError, match="row 1: 'education' is missing"):
        checkpoint.predict_proba(rows)
    rows = new_rows.astype({"fnlwgt": float})
    rows.loc[3, "fnlwgt"] = -np.inf
    with pytest.raises(ValueError, match="row 4: 'fnlwgt' is -inf, not finite"):
        checkpoint.predict_proba(rows)


def test_numbers_written_as_text_and_categories_read_as_numbers_score_as_in_training(csv_run, new_rows):
    checkpoint = load_checkpoint(csv_run[1] / "model.pt")
    expected = checkpoint.predict_proba(new_rows)
    assert np.isfinite(expected).all()
    as_text = new_rows.astype({"age": str, "hours-per-week": str})  # e.g. a frame read with dtype=str
    np.testing.assert_allclose(checkpoint.predict_proba(as_text), expected, atol=1e-7)


def test_a_category_that_pandas_reads_as_a_number_is_still_known(tmp_path):
    """A column typed as text in training ('1', '2', 'x') holds only digits in the rows scored."""
    rng = np.random.default_rng(0)
    n = 120
    frame = pd.DataFrame({"code": rng.choice(["1", "2", "x"], n), "value": rng.normal(size=n),
                          "group": rng.choice(["a", "b"], n)})
    frame["label"] = ((frame["code"] == "1") ^ (rng.random(n) < 0.1)).astype(int)
    frame.to_csv(tmp_path / "coded.csv", index=False)
    argv = ["train", "--csv", str(tmp_path / "coded.csv"), "--label", "label", "--sensitive", "group", "--epochs",
            "3", "--hidden", "4", "--quiet", "--out", str(tmp_path / "run"), "--save", str(tmp_path / "model.pt")]
    assert cli.main(argv) == 0
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    as_text = pd.DataFrame({"code": ["1", "2"], "value": [0.0, 0.0]})
    as_numbers = pd.DataFrame({"code": [1, 2], "value": [0.0, 0.0]})
    np.testing.assert_allclose(checkpoint.predict_proba(as_numbers), checkpoint.predict_proba(as_text), atol=1e-7)


def test_a_model_of_numeric_columns_only_scores_and_refuses_text(tmp_path):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"value": rng.normal(size=80), "group": rng.choice(["a", "b"], 80)})
    frame["label"] = (frame["value"] + rng.normal(scale=0.5, size=80) > 0).astype(int)
    frame.to_csv(tmp_path / "numbers.csv", index=False)
    argv = ["train", "--csv", str(tmp_path / "numbers.csv"), "--label", "label", "--sensitive", "group", "--epochs",
            "1", "--hidden", "4", "--quiet", "--out", str(tmp_path / "run"), "--save", str(tmp_path / "model.pt")]
    assert cli.main(argv) == 0
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert np.isfinite(checkpoint.predict_proba(pd.DataFrame({"value": [0.5, -1.0]}))).all()
    with pytest.raises(ValueError, match="row 2: 'value' is 'n/a', not a number"):
        checkpoint.predict_proba(pd.DataFrame({"value": ["0.5", "n/a"]}))


# ------------------------------------------------------------------------------------------------- threshold


@pytest.mark.parametrize("threshold", ["1.5", "-0.1", "nan", "inf"])
def test_predict_threshold_outside_the_unit_interval_is_refused(csv_run, new_rows, tmp_path, capsys, threshold):
    assert _predict(csv_run[1], new_rows, tmp_path, "--threshold", threshold) == 2
    assert "--threshold must be a number in [0, 1]" in _one_line_error(capsys)
    assert not (tmp_path / "scores.csv").exists()


@pytest.mark.parametrize("threshold, positives", [("0", 8), ("1", 0)])
def test_predict_threshold_bounds_are_accepted(csv_run, new_rows, tmp_path, threshold, positives):
    assert _predict(csv_run[1], new_rows, tmp_path, "--threshold", threshold) == 0
    assert pd.read_csv(tmp_path / "scores.csv")["prediction"].sum() == positives


# ---------------------------------------------------------------------------- the data file of a checkpoint


def test_the_checkpoint_and_the_record_store_the_training_files_hash_and_rows(csv_run):
    path, run = csv_run
    expected = {"kind": "csv", "path": str(path.resolve()), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                "rows": 600}
    payload = torch.load(run / "model.pt", weights_only=False)
    assert payload["format_version"] == FORMAT_VERSION == 2
    assert payload["data_source"] == expected
    assert json.loads((run / "metrics.json").read_text())["dataset"]["source"] == expected


def test_report_refuses_a_training_file_shuffled_in_place(csv_run, training_file, tmp_path, capsys):
    expected = hashlib.sha256(training_file.read_bytes()).hexdigest()[:12]
    frame = pd.read_csv(training_file)
    frame.sample(frac=1.0, random_state=0).to_csv(training_file, index=False)
    found = hashlib.sha256(training_file.read_bytes()).hexdigest()[:12]
    for source in (csv_run[1], csv_run[1] / "model.pt"):  # a run folder and its checkpoint
        assert cli.main(["report", str(source), "--out", str(tmp_path / "report.html")]) == 2
        error = _one_line_error(capsys)
        assert "changed since training" in error and str(training_file) in error
        assert f"expected sha256 {expected} with 600 rows, found {found} with 600 rows" in error
        assert "--data FILE" in error
    assert not (tmp_path / "report.html").exists()


def test_analyze_refuses_a_changed_training_file(csv_run, training_file, tmp_path, capsys):
    frame = pd.read_csv(training_file)
    frame.iloc[:500].to_csv(training_file, index=False)
    argv = ["analyze", "--checkpoint", str(csv_run[1] / "model.pt"), "--out", str(tmp_path / "a"), "--quiet",
            "--permutations", "5"]
    assert cli.main(argv) == 2
    error = _one_line_error(capsys)
    assert "changed since training" in error and "with 500 rows" in error and "with 600 rows" in error
    assert not (tmp_path / "a" / "analysis.json").exists()


def test_a_moved_training_file_is_named_and_a_copy_is_accepted_with_data(csv_run, training_file, tmp_path, capsys):
    checkpoint = csv_run[1] / "model.pt"
    assert cli.main(["report", str(checkpoint), "--out", str(tmp_path / "before.html")]) == 0
    moved = tmp_path / "elsewhere.csv"
    shutil.move(training_file, moved)
    assert cli.main(["report", str(checkpoint), "--out", str(tmp_path / "r.html")]) == 2
    error = _one_line_error(capsys)
    assert f"no file at {training_file}" in error and "--data FILE" in error
    assert cli.main(["report", str(checkpoint), "--out", str(tmp_path / "r.html"), "--data", str(moved)]) == 0
    assert _metrics_table(tmp_path / "r.html") == _metrics_table(tmp_path / "before.html")
    argv = ["analyze", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "a"), "--quiet", "--permutations", "5",
            "--data", str(moved)]
    assert cli.main(argv) == 0 and (tmp_path / "a" / "analysis.json").is_file()


def _metrics_table(path) -> str:
    """The test-metric and per-group tables of an HTML report (the facts name the file, so they differ)."""
    text = path.read_text()
    start = text.index('id="metrics"')
    return text[start:text.index("</table>", text.index('id="group-rates"'))]


def test_a_wrong_file_given_with_data_is_refused(csv_run, tmp_path, capsys):
    other = tmp_path / "other.csv"
    pd.read_csv(csv_run[0]).iloc[::-1].to_csv(other, index=False)
    for argv in (["report", str(csv_run[1] / "model.pt"), "--out", str(tmp_path / "r.html")],
                 ["analyze", "--checkpoint", str(csv_run[1] / "model.pt"), "--out", str(tmp_path / "a")]):
        assert cli.main([*argv, "--data", str(other)]) == 2
        error = _one_line_error(capsys)
        assert f"--data {other} is not the file this model was trained on" in error and "600 rows" in error
    assert not (tmp_path / "r.html").exists()


def test_the_python_api_checks_the_file_too(csv_run, training_file):
    checkpoint = load_checkpoint(csv_run[1] / "model.pt")
    assert len(checkpoint.run_data().test) == 180
    training_file.write_text(training_file.read_text().replace("Private", "private", 1))
    with pytest.raises(DataChangedError, match="changed since training"):
        checkpoint.run_data()
    with pytest.raises(DataChangedError, match="changed since training"):
        load_run_data(checkpoint.spec, source=checkpoint.data_source)


def test_data_applies_only_to_csv_runs(saved_run, tmp_path, capsys):
    run = saved_run("gmn", epochs=1, hidden=16)
    capsys.readouterr()  # what training the shared run printed, if this test trained it
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
    assert cli.main(["report", str(run / "model.pt"), "--out", str(tmp_path / "r.html"),
                     "--data", str(tmp_path / "x.csv")]) == 2
    assert "--data applies to runs trained on a CSV" in _one_line_error(capsys)


def test_the_bundled_adult_files_are_hashed_and_checked(saved_run):
    checkpoint = load_checkpoint(saved_run("gmn", epochs=1, hidden=16) / "model.pt")
    source = checkpoint.data_source
    assert source["kind"] == "bundled" and set(source["files"]) == {"adult.data.gz", "adult.test.gz"}
    assert len(checkpoint.run_data().test) > 0
    tampered = {**source, "files": {**source["files"], "adult.data.gz": "0" * 64}}
    with pytest.raises(DataChangedError, match="bundled data file adult.data.gz"):
        load_run_data(checkpoint.spec, source=tampered)


def test_a_format_1_checkpoint_is_refused(csv_run, tmp_path):
    payload = torch.load(csv_run[1] / "model.pt", weights_only=False)
    payload["format_version"] = 1
    torch.save(payload, tmp_path / "old.pt")
    with pytest.raises(CheckpointError, match="format 1, this version of groupmixnorm reads format 2"):
        load_checkpoint(tmp_path / "old.pt")


# ------------------------------------------------------------- Adult: missing categories filled in as in training


def test_adult_fills_missing_categories_as_its_training_did_and_says_so(saved_run, tmp_path, capsys):
    """Adult's official protocol keeps rows with a missing category (imputed); its checkpoints do the same."""
    run = saved_run("gmn", epochs=1, hidden=16)
    rows = read_adult_frame("test").head(40).drop(columns=["sex", "income"])
    with_missing = int(rows[["workclass", "occupation", "native-country"]].isna().any(axis=1).sum())
    assert with_missing > 0
    rows.to_csv(tmp_path / "adult.csv", index=False)
    assert cli.main(["predict", "--checkpoint", str(run / "model.pt"), "--csv", str(tmp_path / "adult.csv"),
                     "--out", str(tmp_path / "scores.csv")]) == 0
    out = capsys.readouterr().out
    assert f"{with_missing} of 40 rows have a missing category" in out and "as in training" in out
    assert pd.read_csv(tmp_path / "scores.csv")["score"].notna().all()
    checkpoint = load_checkpoint(run / "model.pt")
    with pytest.warns(FilledCategoriesWarning, match=f"{with_missing} of 40 rows"):
        checkpoint.predict_proba(rows)
    unknown = rows.assign(workclass=np.nan)  # a column read as all-missing floats is still filled in
    with pytest.warns(FilledCategoriesWarning, match="40 of 40 rows"):
        filled = checkpoint.predict_proba(unknown)
    with pytest.warns(FilledCategoriesWarning):  # the other columns' missing categories
        np.testing.assert_allclose(filled, checkpoint.predict_proba(rows.assign(workclass="Private")), atol=1e-7)
    rows.loc[rows.index[0], "age"] = np.nan  # numerics were never missing in training: refused
    with pytest.raises(ValueError, match="1 of 40 rows cannot be scored .* row 1: 'age' is missing"):
        checkpoint.predict_proba(rows)


def test_data_without_a_checkpoint_to_score_is_refused(csv_run, tmp_path, capsys):
    folder = tmp_path / "record-only"
    folder.mkdir()
    shutil.copy(csv_run[1] / "metrics.json", folder / "metrics.json")
    assert cli.main(["report", str(folder), "--out", str(tmp_path / "r.html"), "--data", str(csv_run[0])]) == 2
    assert "--data is read to score a checkpoint again" in _one_line_error(capsys)
