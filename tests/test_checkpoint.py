"""Saving a trained model and scoring raw rows with `groupmixnorm predict`, without the attribute."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from groupmixnorm import cli
from groupmixnorm.data import load_dataset, read_adult_frame
from groupmixnorm.training.checkpoint import CheckpointError, FilledCategoriesWarning, load_checkpoint


@pytest.fixture(scope="module")
def trained(saved_run):
    return saved_run("gmn", epochs=1, hidden=16)


def test_checkpoint_scores_raw_rows_like_the_trained_model(trained):
    checkpoint = load_checkpoint(trained / "model.pt")
    data = load_dataset("adult")
    rows = read_adult_frame("test").head(200).drop(columns=["sex", "income"])
    with pytest.warns(FilledCategoriesWarning, match="missing category"):  # imputed as in training
        scores = checkpoint.predict_proba(rows)
    with torch.no_grad():
        direct = torch.sigmoid(checkpoint.method.predict_logits(
            checkpoint.model, torch.as_tensor(data.test.X[:200]))).numpy()
    np.testing.assert_allclose(scores, direct, atol=1e-6)
    assert checkpoint.sensitive == "sex" and checkpoint.group_names == ["Female", "Male"]
    assert "sex" not in checkpoint.input_columns


def test_predict_command_writes_scores_with_the_id_column(trained, tmp_path, capsys):
    rows = read_adult_frame("test").head(50).drop(columns=["sex", "income"])
    rows.insert(0, "person", [f"p{i}" for i in range(50)])
    rows.to_csv(tmp_path / "new.csv", index=False)
    argv = ["predict", "--checkpoint", str(trained / "model.pt"), "--csv", str(tmp_path / "new.csv"),
            "--id-column", "person", "--out", str(tmp_path / "preds.csv")]
    assert cli.main(argv) == 0
    predictions = pd.read_csv(tmp_path / "preds.csv")
    assert list(predictions.columns) == ["person", "score", "prediction"]
    assert list(predictions["person"]) == list(rows["person"])
    assert predictions["score"].between(0, 1).all()
    assert (predictions["prediction"] == (predictions["score"] >= 0.5)).all()
    # The scores equal those of the same rows scored in Python.
    with pytest.warns(FilledCategoriesWarning):
        expected = load_checkpoint(trained / "model.pt").predict_proba(rows)
    np.testing.assert_allclose(predictions["score"], expected, atol=1e-6)


@pytest.mark.parametrize(
    "content, message",
    [(b"", "not a readable"), (b"PK\x03\x04 truncated zip", "not a readable"), (b"\x80\x04K\x01.", "not a readable")],
)
def test_a_damaged_checkpoint_is_a_clear_error(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_a_foreign_torch_file_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a groupmixnorm checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


def test_a_checkpoint_of_another_format_version_is_refused(trained, tmp_path):
    payload = torch.load(trained / "model.pt", weights_only=False)
    payload["format_version"] = 99
    torch.save(payload, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(tmp_path / "future.pt")


def test_predict_errors_are_one_line(trained, tmp_path, capsys):
    rows = read_adult_frame("test").head(5).drop(columns=["sex", "income", "age"])
    rows.to_csv(tmp_path / "no_age.csv", index=False)
    (tmp_path / "empty.csv").write_text("")
    cases = [
        (["--checkpoint", str(tmp_path / "missing.pt"), "--csv", str(tmp_path / "no_age.csv")], "no checkpoint file"),
        (["--checkpoint", str(trained / "model.pt"), "--csv", str(tmp_path / "no_age.csv")], "age"),
        (["--checkpoint", str(trained / "model.pt"), "--csv", str(tmp_path / "empty.csv")], "is empty"),
        (["--checkpoint", str(trained / "model.pt"), "--csv", str(tmp_path / "nope.csv")], "no CSV file"),
    ]
    for extra, message in cases:
        assert cli.main(["predict", *extra, "--out", str(tmp_path / "p.csv")]) == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and message in error and "Traceback" not in error
    assert not (tmp_path / "p.csv").exists()


def test_the_record_of_a_saved_run_is_unchanged(trained):
    record = json.loads((trained / "metrics.json").read_text())
    assert "--save" not in record["command"] and record["method"] == "gmn"
