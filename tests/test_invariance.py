"""Invariance analysis: probes and MMD find a planted attribute and stay at chance without one; the
`analyze` command writes analysis.json and embedding plots for a saved model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from groupmixnorm.cli import main
from groupmixnorm.experiments import invariance
from groupmixnorm.experiments.invariance import (ProbeRowsWarning, layer_representations, mmd_test, probe_scores,
                                                 strongest_probe)


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


def test_representations_are_named_in_forward_order_and_the_output_last() -> None:
    from groupmixnorm.methods.models import build_mlp

    model = build_mlp(5, (6, 4), norm="groupmixnorm", placement="head", num_groups=2).eval()
    found = layer_representations(model, model, torch.randn(10, 5))
    assert list(found) == ["hidden_1", "hidden_2", "groupmixnorm_1", "logit"]
    assert [found[name].shape[1] for name in found] == [6, 4, 4, 1]


def test_the_output_of_a_layer_on_the_logit_is_reported_once_under_the_layers_name() -> None:
    from groupmixnorm.methods.models import build_mlp

    model = build_mlp(5, (6, 4), norm="groupmixnorm", placement="head,logit", num_groups=2).eval()
    found = layer_representations(model, lambda x: model(x).squeeze(-1), torch.randn(10, 5))
    assert list(found) == ["hidden_1", "hidden_2", "groupmixnorm_1", "groupmixnorm_2"]  # no "logit" copy
    assert [found[name].shape[1] for name in found] == [6, 4, 4, 1]


def test_the_most_revealing_probe_is_chosen_either_way_round() -> None:
    probes = {"logistic": {"balanced_accuracy": 0.500, "auc": 0.362}, "mlp": {"balanced_accuracy": 0.520, "auc": 0.530}}
    name, auc = strongest_probe(probes)
    assert name == "logistic" and auc == pytest.approx(0.638)
    for planted in (True, False):
        for score in probe_scores(*_features(planted=planted), seed=0).values():
            assert score["auc_either_way"] == pytest.approx(max(score["auc"], 1 - score["auc"]))
    rng = np.random.default_rng(2)
    groups = rng.integers(0, 3, 600)
    for score in probe_scores(rng.normal(size=(600, 2)), groups).values():  # per group, then averaged
        assert 0.5 <= score["auc_either_way"] and score["auc"] <= score["auc_either_way"] + 1e-12


def _erm_model(features: int) -> tuple[torch.nn.Module, object]:
    from groupmixnorm.methods import make_method
    from groupmixnorm.methods.models import build_mlp

    torch.manual_seed(0)
    return build_mlp(features, (8,)).eval(), make_method("erm")


def test_analysis_reports_the_flipped_probe_and_not_chance(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(invariance, "probe_scores", lambda features, groups, seed=0: {
        "logistic": {"balanced_accuracy": 0.500, "auc": 0.362, "auc_either_way": 0.638},
        "mlp": {"balanced_accuracy": 0.520, "auc": 0.530, "auc_either_way": 0.530}})
    features, groups = _features(planted=False, n=400)
    model, method = _erm_model(features.shape[1])
    options = invariance.AnalysisOptions(permutations=10, mmd_rows_per_group=50)
    layers = invariance.analyze_split(model, method, torch.as_tensor(features, dtype=torch.float32),
                                      np.zeros(len(groups), dtype=np.int64), groups, group_names=["a", "b"],
                                      options=options)
    logit = layers["logit"]
    assert logit["probe"] == "logistic" and logit["probe_auc"] == pytest.approx(0.638)
    assert logit["probe_balanced_accuracy"] == pytest.approx(0.500) and logit["output"] is True
    assert layers["hidden_1"]["output"] is False


def test_a_group_with_few_scoring_rows_is_named_with_its_count() -> None:
    rng = np.random.default_rng(0)
    groups = np.r_[np.zeros(900), np.ones(60)].astype(np.int64)  # the scoring half holds 30 rows of group 1
    features = rng.normal(size=(len(groups), 3))
    model, method = _erm_model(3)
    options = invariance.AnalysisOptions(permutations=10, mmd_rows_per_group=50)
    with pytest.warns(ProbeRowsWarning) as caught:
        invariance.analyze_split(model, method, torch.as_tensor(features, dtype=torch.float32),
                                 np.zeros(len(groups), dtype=np.int64), groups, group_names=["Male", "Female"],
                                 options=options)
    messages = [str(w.message) for w in caught if issubclass(w.category, ProbeRowsWarning)]
    assert len(messages) == 1 and "\n" not in messages[0]
    assert "'Female' (30 rows)" in messages[0] and "Male" not in messages[0].replace("Female", "")


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


def test_analyze_warns_in_one_line_about_a_small_group_and_reports_the_output_once(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    checkpoint = tmp_path / "model.pt"
    assert main(["train", "--dataset", "adult", "--method", "gmn", "--epochs", "1", "--iterations", "10",
                 "--hidden", "16", "--quiet", "--out", str(tmp_path / "run"), "--save", str(checkpoint)]) == 0
    capsys.readouterr()
    out = tmp_path / "analysis"
    assert main(["analyze", "--checkpoint", str(checkpoint), "--out", str(out), "--max-rows", "150",
                 "--permutations", "20"]) == 0
    printed, errors = capsys.readouterr()
    lines = errors.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("groupmixnorm analyze: warning: "), lines
    assert "group 'Female' (25 rows) has fewer than 50" in lines[0]  # a third of 150 rows are women, half score
    layers = json.loads((out / "analysis.json").read_text())["layers"]
    assert list(layers) == ["hidden_1", "groupmixnorm_1"] and layers["groupmixnorm_1"]["output"]
    assert "logit" not in printed and printed.count("groupmixnorm_1") == 1


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
    assert all("with AUC" in line and "balanced accuracy" in line and "(chance: 0.50 and 0.50)" in line
               for line in verdicts)
    records = sorted((tmp_path / "adult-invariance" / "records").glob("analysis-*.json"))
    assert len(records) == len(SETTINGS)
    # Plots of seed 0 for each setting, the output's among them; nothing written for analyses without a plot folder.
    outputs = {}
    for path in records:
        record = json.loads(path.read_text())
        outputs[f"{record['method']}-{record['setting_index']}"] = [n for n, v in record["layers"].items() if v["output"]]
    assert outputs["gmn-4"] == ["groupmixnorm_1"] and outputs["erm-0"] == ["logit"]  # gmn on the logit: no copy
    for folder, (output,) in outputs.items():
        assert (tmp_path / "adult-invariance" / folder / f"embedding_{output}.png").is_file()
    assert len(list((tmp_path / "adult-invariance").glob("*/embedding_*.png"))) == sum(
        len(json.loads(path.read_text())["layers"]) for path in records)
    before = {path: path.stat().st_mtime_ns for path in records}
    assert main(["bench", "adult-invariance", "--quick", "--results-dir", str(tmp_path), "--quiet"]) == 0
    assert {path: path.stat().st_mtime_ns for path in records} == before  # finished analyses are reused


@pytest.mark.slow
def test_quick_digits_invariance_bench_analyzes_image_models_in_memory(tmp_path: Path) -> None:
    from groupmixnorm.experiments.invariance_bench import BENCHES, DIGITS_SETTINGS, invariance_specs

    specs = invariance_specs(BENCHES["textured-digits-invariance"], seeds=2)
    assert {(spec.dataset, spec.sensitive) for spec, _ in specs} == {("textured-digits", "texture")}
    assert len(specs) == 2 * len(DIGITS_SETTINGS)
    assert main(["bench", "colored-digits-invariance", "--quick", "--results-dir", str(tmp_path), "--quiet"]) == 0
    report = (tmp_path / "colored-digits-invariance.md").read_text()
    assert report.startswith("# Does the representation forget the protected attribute? (colored digits, color)")
    verdicts = [line for line in report.splitlines() if line.startswith("- **")]
    assert len(verdicts) == len(DIGITS_SETTINGS) and all("a probe recovers color from" in v for v in verdicts)
    records = sorted((tmp_path / "colored-digits-invariance" / "records").glob("analysis-*.json"))
    assert len(records) == len(DIGITS_SETTINGS)
    assert not list((tmp_path / "colored-digits-invariance" / "records").glob("*.pt"))  # no image checkpoints
    first = json.loads(records[0].read_text())
    assert first["layers"] and all(0.5 <= layer["probe_auc"] <= 1.0 for layer in first["layers"].values())
    before = {path: path.stat().st_mtime_ns for path in records}
    assert main(["bench", "colored-digits-invariance", "--quick", "--results-dir", str(tmp_path), "--quiet"]) == 0
    assert {path: path.stat().st_mtime_ns for path in records} == before


def _record(index: int, layers: dict[str, tuple[float, float, bool]]) -> dict:
    """An analysis record of the invariance bench whose layers have the given logistic (AUC, balanced
    accuracy) and output flag; the MLP probe sits at chance."""
    return {"setting_index": index, "method": "gmn", "setting": f"s{index}", "why": "w", "seed": 0, "ap": 0.7,
            "dp_gap": 0.02, "eodds_gap": 0.05, "chance_balanced_accuracy": 0.5, "train_command": "c",
            "layers": {name: {"probe_balanced_accuracy": 0.0, "probe_auc": 0.0, "mmd": 0.01, "mmd_p_value": 0.5,
                              "output": output,
                              "probes": {"logistic": {"balanced_accuracy": ba, "auc": auc},
                                         "mlp": {"balanced_accuracy": 0.5, "auc": 0.5}}}
                       for name, (auc, ba, output) in layers.items()}}


def test_the_bench_report_reads_auc_either_way_and_the_output_layer(tmp_path: Path) -> None:
    from groupmixnorm.experiments.invariance_bench import write_invariance_report

    records = [_record(0, {"hidden_1": (0.90, 0.82, False), "groupmixnorm_1": (0.362, 0.500, True)})]
    text = write_invariance_report(records, tmp_path / "r.md", "cmd").read_text()
    verdict = next(line for line in text.splitlines() if line.startswith("- **"))
    assert "from `hidden_1` with AUC 0.900 and balanced accuracy 0.820" in verdict
    assert "from the output (`groupmixnorm_1`) with AUC 0.638 and balanced accuracy 0.500." in verdict
    assert "| groupmixnorm_1 | 1 | 0.6380 ± 0.0000 | 0.5000 ± 0.0000 |" in text


def test_the_committed_analyses_are_summarized_as_the_code_summarizes_them() -> None:
    from groupmixnorm.experiments.invariance_bench import invariance_table

    folder = Path(__file__).resolve().parents[1] / "docs" / "results" / "adult-invariance" / "records"
    records = [json.loads(path.read_text()) for path in sorted(folder.glob("analysis-*.json"))]
    for record in records:
        for layer in record["layers"].values():
            assert (layer["probe"], layer["probe_auc"]) == strongest_probe(layer["probes"])
    table = invariance_table(records)
    assert len(records) == 50 and table["output"].sum() == 10  # one output per setting, reported once
    outputs = table.loc[table["output"]].set_index("setting")["layer"]
    assert outputs["align=1.0,align_quantiles=16,placement=logit"] == "groupmixnorm_1"  # the layer on the logit
    assert (table["probe_auc_mean"] >= 0.5).all()
