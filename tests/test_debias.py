"""Debiasing a pre-trained ERM network with `groupmixnorm debias`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from groupmixnorm import cli
from groupmixnorm.data import Split
from groupmixnorm.experiments.debias import start_from_pretrained, stratified_fraction
from groupmixnorm.experiments.spec import load_run_data
from groupmixnorm.methods import make_method
from groupmixnorm.methods.base import ModelSpec
from groupmixnorm.training.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def erm_checkpoint(saved_run):
    return saved_run("erm", epochs=2, hidden=32)


def test_stratified_fraction_keeps_every_cell_share_and_is_seeded():
    rng = np.random.default_rng(0)
    a, y = rng.integers(0, 2, 2000), (rng.random(2000) < 0.3).astype(np.int64)
    split = Split(rng.normal(size=(2000, 3)).astype(np.float32), y, a)
    part = stratified_fraction(split, 0.1, seed=1)
    assert len(part.y) == 200
    for cell in range(4):
        expected = np.mean(a * 2 + y == cell)
        assert np.mean(part.a * 2 + part.y == cell) == pytest.approx(expected, abs=0.01)
    again = stratified_fraction(split, 0.1, seed=1)
    assert np.array_equal(part.X, again.X)
    assert not np.array_equal(part.X, stratified_fraction(split, 0.1, seed=2).X)
    with pytest.raises(ValueError, match="fraction"):
        stratified_fraction(split, 0.0, seed=0)


def test_the_inserted_layer_starts_as_the_identity(erm_checkpoint):
    checkpoint = load_checkpoint(erm_checkpoint / "model.pt")
    data = load_run_data(checkpoint.spec)
    model = make_method("gmn").build_model(ModelSpec(data.num_features, data.num_groups, (32,)))
    start_from_pretrained(checkpoint.model.state_dict(), torch.as_tensor(data.train.X))(model)
    model.eval()
    x = torch.as_tensor(data.test.X[:300])
    with torch.no_grad():
        torch.testing.assert_close(model(x), checkpoint.model(x), atol=1e-5, rtol=1e-5)


def test_debias_with_gmn_shrinks_the_gap_of_the_pretrained_model(erm_checkpoint, tmp_path):
    before = json.loads((erm_checkpoint / "metrics.json").read_text())
    argv = ["debias", "--checkpoint", str(erm_checkpoint / "model.pt"), "--fraction", "0.1", "--epochs", "6",
            "--quiet", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    after = json.loads((tmp_path / "metrics.json").read_text())
    assert after["method"] == "gmn" and after["setting"].startswith("fraction=0.1,")
    assert after["dataset"]["rows"]["train"] == pytest.approx(0.1 * before["dataset"]["rows"]["train"], abs=2)
    assert after["dp_gap"] < 0.6 * before["dp_gap"]
    assert after["accuracy"] > 0.75


def test_debias_errors(erm_checkpoint, tmp_path, capsys):
    gmn_run = tmp_path / "gmn"
    assert cli.main(["train", "--method", "gmn", "--epochs", "1", "--hidden", "8", "--quiet", "--out", str(gmn_run),
                     "--save", str(gmn_run / "model.pt")]) == 0
    capsys.readouterr()  # the training's own warnings (a one-epoch model may be no better than the majority class)
    cases = [
        (["--checkpoint", str(gmn_run / "model.pt")], "starts from an ERM checkpoint"),
        (["--checkpoint", str(erm_checkpoint / "model.pt"), "--lam", "1"], "--lam does not apply to --method gmn"),
        (["--checkpoint", str(erm_checkpoint / "model.pt"), "--fraction", "1.5"], "fraction must be in (0, 1]"),
    ]
    for extra, message in cases:
        assert cli.main(["debias", *extra, "--out", str(tmp_path / "x")]) == 2
        error = capsys.readouterr().err.strip()
        assert message in error and len(error.splitlines()) == 1


def test_quick_debias_bench_writes_its_table_and_reuses_records(tmp_path, monkeypatch):
    assert cli.main(["bench", "adult-debias", "--quick", "--quiet", "--results-dir", str(tmp_path)]) == 0
    text = (tmp_path / "adult-debias.md").read_text()
    for row in ("| pre-trained ERM | all | 1 |", "| gmn from scratch | all | 1 |", "| debias gmn | 5% | 1 |",
                "| debias gapreg | 5% | 1 |", "| debias gmn | all | 1 |"):
        assert row in text
    records = sorted((tmp_path / "adult-debias" / "records").glob("*.json"))
    assert len(records) == 6
    before = {p.name: p.stat().st_mtime_ns for p in records}

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("groupmixnorm.experiments.bench.execute", no_training)
    monkeypatch.setattr("groupmixnorm.experiments.debias.train", no_training)
    assert cli.main(["bench", "adult-debias", "--quick", "--quiet", "--results-dir", str(tmp_path)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in records} == before


def test_a_quick_debias_bench_refuses_the_folder_of_the_full_one(tmp_path, capsys):
    committed = Path(__file__).resolve().parents[1] / "docs" / "results" / "adult-debias.md"
    shutil.copy(committed, tmp_path / "adult-debias.md")
    assert cli.main(["bench", "adult-debias", "--quick", "--quiet", "--results-dir", str(tmp_path)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "generated by `groupmixnorm bench adult-debias --seeds 5`" in error
    assert (tmp_path / "adult-debias.md").read_bytes() == committed.read_bytes()
    assert not (tmp_path / "adult-debias").exists()  # refused before the first run
