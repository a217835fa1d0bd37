"""ONNX export: the network without the attribute, its preprocessing in JSON, onnxruntime against PyTorch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from groupmixnorm import cli
from groupmixnorm.data import read_adult_frame
from groupmixnorm.training.checkpoint import load_checkpoint
from groupmixnorm.export import export_onnx

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@pytest.fixture(scope="module")
def exported(saved_run, tmp_path_factory):
    """The short gmn Adult run of the checkpoint tests, exported with the command line."""
    folder = saved_run("gmn", epochs=1, hidden=16)
    target = tmp_path_factory.mktemp("export") / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(folder / "model.pt"), "--onnx", str(target)]) == 0
    return load_checkpoint(folder / "model.pt"), target


def test_onnxruntime_matches_pytorch_on_adult_test_rows(exported):
    checkpoint, path = exported
    rows = read_adult_frame("test").iloc[:500]
    features = np.asarray(checkpoint.preprocessor.transform(rows[checkpoint.input_columns]), dtype=np.float32)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features"]  # no protected attribute
    logit, probability = session.run(["logit", "probability"], {"features": features})
    with torch.no_grad():
        expected = checkpoint.method.predict_logits(checkpoint.model, torch.from_numpy(features)).numpy()
    assert np.abs(logit - expected).max() < 1e-5
    assert np.abs(probability - checkpoint.predict_proba(rows)).max() < 1e-5
    assert 0.05 < (probability >= 0.5).mean() < 0.95  # a real model, not a constant


def test_the_json_alone_reproduces_the_preprocessing(exported):
    checkpoint, path = exported
    spec = json.loads(path.with_name("model.onnx.json").read_text())
    rows = read_adult_frame("test").iloc[:300]
    assert spec["protected_attribute"] == {"name": "sex", "groups": ["Female", "Male"], "is_input": False}
    assert "sex" not in spec["raw_columns"] and spec["input"]["shape"][1] == len(spec["feature_names"])
    np.testing.assert_allclose(_features_from_json(spec, rows),
                               checkpoint.preprocessor.transform(rows[checkpoint.input_columns]), atol=1e-9)


def _features_from_json(spec: dict, rows) -> np.ndarray:
    """What a deployment without scikit-learn would write: the steps of the JSON, in order."""
    blocks = []
    for step in spec["steps"]:
        values = rows[step["columns"]]
        if "impute_missing" in step:
            values = values.fillna(dict(zip(step["columns"], step["impute_missing"]["fill"])))
        if "standardize" in step:
            mean, scale = (np.array(step["standardize"][key]) for key in ("mean", "scale"))
            blocks.append((values.to_numpy(dtype=float) - mean) / scale)
        if "one_hot" in step:
            for column, categories in zip(step["columns"], step["one_hot"]["categories"]):
                blocks.append(np.stack([(values[column] == c).to_numpy(dtype=float) for c in categories], axis=1))
    return np.concatenate(blocks, axis=1)


def test_a_model_that_needs_the_attribute_is_not_exported(exported, tmp_path):
    checkpoint, _ = exported
    checkpoint.method.eval_mode = "group"
    try:
        with pytest.raises(ValueError, match="needs the protected attribute"):
            export_onnx(checkpoint, tmp_path / "model.onnx")
    finally:
        checkpoint.method.eval_mode = "population"
    assert not (tmp_path / "model.onnx").exists()


def test_export_errors_are_one_line(tmp_path, capsys):
    code = cli.main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--onnx", str(tmp_path / "m.onnx")])
    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and "no checkpoint file" in error
