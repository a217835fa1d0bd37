"""Invariance analysis: probes and MMD find a planted attribute and stay at chance without one; the
`analyze` command writes analysis.json and embedding plots for a saved model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from groupmixnorm.cli import main
from groupmixnorm.experiments.invariance import layer_representations, mmd_test, probe_scores


def _features(planted: bool, n: int = 1200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = (rng.random(n) < 0.35).astype(np.int64)
    features = rng.normal(size=(n, 8))
    if planted:
        features[:, 3] += 4.0 * groups  # one coordinate carries the attribute (Bayes balanced accuracy 0.98)
    return features, groups


def test_a_planted_attribute_is_found() -> None:
    features, groups = _features(planted=True)
    scores = probe_scores(features, groups, seed=0)
    assert scores["logistic"]["balanced_accuracy"] > 0.9 and scores["mlp"]["balanced_accuracy"] > 0.9
    assert scores["logistic"]["auc"] > 0.95
    mmd, p_value = mmd_test(features[:600], groups[:600], permutations=100)
    assert mmd > 0.05 and p_value < 0.02


def test_features_independent_of_the_attribute_stay_at_chance() -> None:
    features, groups = _features(planted=False)
    scores = probe_scores(features, groups, seed=0)
    for probe in scores.values():
        assert abs(probe["balanced_accuracy"] - 0.5) < 0.06
        assert abs(probe["auc"] - 0.5) < 0.08
    mmd, p_value = mmd_test(features[:600], groups[:600], permutations=100)
    assert abs(mmd) < 0.02 and p_value > 0.05


def test_more_than_two_groups() -> None:
    rng = np.random.default_rng(1)
    groups = rng.integers(0, 3, 900)
    features = rng.normal(size=(900, 4)) + np.eye(4)[groups] * 3.0
    assert probe_scores(features, groups)["logistic"]["balanced_accuracy"] > 0.9
    assert mmd_test(features[:450], groups[:450], permutations=50)[1] < 0.05


def test_representations_are_named_in_forward_order() -> None:
    from groupmixnorm.methods.models import build_mlp

    model = build_mlp(5, (6, 4), norm="groupmixnorm", placement="head,logit", num_groups=2).eval()
    found = layer_representations(model, model, torch.randn(10, 5))
    assert list(found) == ["hidden_1", "hidden_2", "groupmixnorm_1", "groupmixnorm_2", "logit"]
    assert [found[name].shape[1] for name in found] == [6, 4, 4, 1, 1]


def test_analyze_command_writes_analysis_and_plots(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.pt"
    assert main(["train", "--dataset", "adult", "--method", "erm", "--epochs", "1", "--iterations", "20",
                 "--hidden", "16,8", "--quiet", "--out", str(tmp_path / "run"), "--save", str(checkpoint)]) == 0
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--max-rows", "1500",
                 "--permutations", "50", "--quiet"]) == 0
    analysis = json.loads((out / "analysis.json").read_text())
    assert list(analysis["layers"]) == ["hidden_1", "hidden_2", "logit"]
    for layer in analysis["layers"].values():
        assert {"probe_balanced_accuracy", "probe_auc", "mmd", "mmd_p_value"} <= set(layer)
        assert 0.0 <= layer["mmd_p_value"] <= 1.0
    # An ERM model's representation of Adult carries sex: the first hidden layer gives it away.
    assert analysis["layers"]["hidden_1"]["probe_balanced_accuracy"] > 0.7
    assert sorted(p.name for p in out.glob("*.png")) == ["embedding_hidden_1.png", "embedding_hidden_2.png",
                                                         "embedding_logit.png"]


def test_analyze_rejects_a_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", "--checkpoint", str(tmp_path / "none.pt"), "--out", str(tmp_path / "a")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_quick_invariance_bench_writes_a_verdict_per_setting(tmp_path: Path) -> None:
    from groupmixnorm.experiments.invariance_bench import SETTINGS

    assert main(["bench", "adult-invariance", "--quick", "--results-dir", str(tmp_path), "--quiet"]) == 0
    report = (tmp_path / "adult-invariance.md").read_text()
    verdicts = [line for line in report.splitlines() if line.startswith("- **")]
    assert len(verdicts) == len(SETTINGS)
    assert all("balanced accuracy" in line and "chance 0.50" in line for line in verdicts)
    records = sorted((tmp_path / "adult-invariance" / "records").glob("analysis-*.json"))
    assert len(records) == len(SETTINGS)
    # Plots of seed 0 for each setting; nothing written for analyses without a plot folder.
    assert len(list((tmp_path / "adult-invariance").glob("*/embedding_logit.png"))) == len(SETTINGS)
    before = {path: path.stat().st_mtime_ns for path in records}
    assert main(["bench", "adult-invariance", "--quick", "--results-dir", str(tmp_path), "--quiet"]) == 0
    assert {path: path.stat().st_mtime_ns for path in records} == before  # finished analyses are reused
