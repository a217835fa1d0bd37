"""``train``'s defaults on any table: a fixed step budget, warnings on a useless model, and several
protected columns of a CSV (intersectional groups), through to checkpoints and ``predict``."""

from __future__ import annotations

import json
import shlex

import numpy as np
import pandas as pd
import pytest

from groupmixnorm import cli
from groupmixnorm.data import load_csv
from groupmixnorm.data.csv import CSVError
from groupmixnorm.data.tabular import intersect_groups
from groupmixnorm.experiments.tabular_bench import FULL_CONFIG
from groupmixnorm.metrics import useless_model_warnings
from groupmixnorm.metrics.sanity import COLLAPSED_STD
from groupmixnorm.training import TrainConfig
from groupmixnorm.training.checkpoint import load_checkpoint

TINY = ["--hidden", "8", "--quiet"]


def _spec(argv: list[str]):
    return cli.spec_from_args(cli.build_parser().parse_args(argv))


def _reparse(command: str):
    return _spec(shlex.split(command)[1:])


def _as_recorded(spec) -> dict:
    """A spec as metrics.json holds it (tuples become lists)."""
    return json.loads(json.dumps(spec.to_dict()))


def _train(argv: list[str], out) -> dict:
    assert cli.main([*argv, "--out", str(out)]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def people_csv(tmp_path_factory):
    """600 rows whose label follows ``x`` closely, with two protected columns (sex and race) and a
    numeric code (band); ``noise`` carries nothing."""
    rng = np.random.default_rng(0)
    n = 600
    frame = pd.DataFrame({
        "x": rng.normal(size=n),
        "noise": rng.normal(size=n),
        "sex": rng.choice(["female", "male"], size=n),
        "race": rng.choice(["black", "white"], size=n),
        "band": rng.choice([1, 2], size=n),
    })
    frame["label"] = (frame["x"] > 0).astype(int)
    path = tmp_path_factory.mktemp("csv") / "people.csv"
    frame.to_csv(path, index=False)
    return path


# --- the step budget ----------------------------------------------------------------------------------


def test_a_table_given_no_budget_trains_the_benchmarks_fixed_number_of_steps(tmp_path):
    record = _train(["train", "--dataset", "german", "--method", "erm", *TINY], tmp_path)
    config = record["spec"]["config"]
    assert (config["epochs"], config["iterations"]) == (FULL_CONFIG.epochs, FULL_CONFIG.iterations)
    assert len(record["history"]) == FULL_CONFIG.epochs
    words = shlex.split(record["command"])
    assert words[words.index("--epochs") + 1] == str(FULL_CONFIG.epochs)
    assert words[words.index("--iterations") + 1] == str(FULL_CONFIG.iterations)
    assert _as_recorded(_reparse(record["command"])) == record["spec"]  # the command reproduces the run


@pytest.mark.parametrize("given, expected", [
    (["--epochs", "3"], (3, None)),  # full passes, as before
    (["--iterations", "7"], (TrainConfig.epochs, 7)),
    (["--epochs", "2", "--iterations", "4"], (2, 4)),
])
def test_a_budget_given_is_kept(given, expected):
    spec = _spec(["train", "--dataset", "german", *given, "--out", "x"])
    assert (spec.config.epochs, spec.config.iterations) == expected
    assert _reparse(spec.command()) == spec


def test_images_keep_full_passes_by_default():
    spec = _spec(["train", "--dataset", "colored-digits", "--out", "x"])
    assert (spec.config.epochs, spec.config.iterations) == (TrainConfig.epochs, None)


def test_help_states_the_default_budget(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    steps = FULL_CONFIG.epochs * FULL_CONFIG.iterations
    assert f"{FULL_CONFIG.epochs} epochs of {FULL_CONFIG.iterations} batches: {steps:,} optimizer steps" in text


# --- warnings on a useless model ----------------------------------------------------------------------


def test_no_better_than_the_majority_class_is_warned_about():
    y = np.array([1, 1, 1, 0])
    lines = useless_model_warnings(y, np.array([0.9, 0.8, 0.7, 0.6]))  # all positive: 0.75, the majority's
    assert len(lines) == 1 and "test accuracy 0.7500 is no better than predicting the majority class (0.7500)" \
        in lines[0]
    assert useless_model_warnings(y, np.array([0.9, 0.8, 0.7, 0.1])) == []


def test_collapsed_scores_are_warned_about_even_when_they_rank_well():
    y = np.array([0, 0, 1, 1])
    scores = np.array([0.40, 0.41, 0.60, 0.61]) * 0.02 + 0.49  # accurate at 0.5, but a spread of 0.002
    assert np.std(scores) < COLLAPSED_STD
    lines = useless_model_warnings(y, scores)
    assert len(lines) == 1 and "collapsed" in lines[0]
    named = useless_model_warnings(y, np.full(4, 0.3), model="the chosen model", split="validation")
    assert len(named) == 2 and all(line.startswith("the chosen model's validation") for line in named)


def test_train_warns_on_a_useless_model_and_records_it(tmp_path, capsys):
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"c": np.ones(300), "g": rng.choice(["a", "b"], 300), "y": (rng.random(300) < 0.2) * 1})
    frame.to_csv(tmp_path / "flat.csv", index=False)  # one constant input: every row gets the same score
    record = _train(["train", "--csv", str(tmp_path / "flat.csv"), "--label", "y", "--sensitive", "g",
                     "--method", "erm", "--epochs", "1", *TINY], tmp_path / "run")
    assert len(record["warnings"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if "warning: the selected model" in line] == \
        [f"groupmixnorm train: warning: {line}" for line in record["warnings"]]


# --- several protected columns ------------------------------------------------------------------------


def test_intersect_groups_joins_values_and_keeps_one_column_as_it_is():
    frame = pd.DataFrame({"sex": ["female", "male", None], "race": ["black", "white", "white"], "n": [1, 2, 3]})
    assert intersect_groups(frame[["sex", "race"]]).tolist()[:2] == ["female & black", "male & white"]
    assert intersect_groups(frame[["sex", "race"]]).isna().tolist() == [False, False, True]
    assert intersect_groups(frame[["n"]]).tolist() == [1, 2, 3]


def test_a_csv_with_two_protected_columns_has_their_combinations_as_groups(people_csv):
    data = load_csv(people_csv, label="label", sensitive="sex, race")
    assert data.sensitive == "sex,race"
    assert data.group_names == ["female & black", "female & white", "male & black", "male & white"]
    assert not any(name.startswith(("sex", "race")) for name in data.feature_names)  # not inputs
    raw = pd.read_csv(people_csv)
    counts = raw.groupby(["sex", "race"]).size().to_numpy()
    found = np.bincount(np.concatenate([data.train.a, data.val.a, data.test.a]), minlength=4)
    np.testing.assert_array_equal(found, counts)


@pytest.mark.parametrize("sensitive, expected", [
    ("sex,religion", "unknown sensitive column 'religion'"),
    ("sex,,race", "an empty column name"),
    ("sex,sex", "name 'sex' more than once"),
    ("label,sex", "the label and the protected attribute are the same column 'label'"),
])
def test_bad_protected_columns_are_named(people_csv, sensitive, expected):
    with pytest.raises(CSVError, match=expected):
        load_csv(people_csv, label="label", sensitive=sensitive)


def test_train_on_two_protected_columns_records_and_reproduces_them(people_csv, tmp_path):
    record = _train(["train", "--csv", str(people_csv), "--label", "label", "--sensitive", "sex,race",
                     "--method", "erm", "--epochs", "3", *TINY], tmp_path)
    assert set(record["group_rates"]) == {"female & black", "female & white", "male & black", "male & white"}
    assert record["dataset"]["sensitive"] == "sex,race"
    assert record["warnings"] == []  # the label follows x: a model of some use
    assert _as_recorded(_reparse(record["command"])) == record["spec"]


def test_train_names_a_missing_protected_column(people_csv, tmp_path, capsys):
    argv = ["train", "--csv", str(people_csv), "--label", "label", "--sensitive", "sex,religion", "--method", "erm",
            "--epochs", "1", *TINY, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "'religion'" in capsys.readouterr().err


def _save(people_csv, tmp_path, sensitive: str, *options: str):
    path = tmp_path / "model.pt"
    _train(["train", "--csv", str(people_csv), "--label", "label", "--sensitive", sensitive, *options,
            "--epochs", "2", *TINY, "--save", str(path)], tmp_path / "run")
    return load_checkpoint(path)


def test_a_model_using_the_groups_at_prediction_needs_every_protected_column(people_csv, tmp_path):
    checkpoint = _save(people_csv, tmp_path, "sex,race", "--method", "gmn", "--eval-mode", "group")
    frame = pd.read_csv(people_csv)
    scores = checkpoint.predict_proba(frame)
    assert scores.shape == (len(frame),) and np.isfinite(scores).all()
    with pytest.raises(ValueError, match="needs the column\\(s\\) 'race' to predict"):
        checkpoint.predict_proba(frame.drop(columns=["race"]))
    # The groups must be the training's: swapping them changes a group-normalized model's scores.
    swapped = frame.assign(sex=frame["sex"].map({"female": "male", "male": "female"}))
    assert not np.allclose(checkpoint.predict_proba(swapped), scores)


@pytest.mark.parametrize("sensitive, groups", [("sex,band", ["female & 1", "female & 2", "male & 1", "male & 2"]),
                                               ("band", ["1", "2"])])
def test_a_numeric_protected_column_is_read_again_at_prediction(people_csv, tmp_path, sensitive, groups):
    checkpoint = _save(people_csv, tmp_path, sensitive, "--method", "gmn", "--eval-mode", "group")
    assert checkpoint.group_names == groups  # text, while predict reads band as numbers
    assert np.isfinite(checkpoint.predict_proba(pd.read_csv(people_csv))).all()


def test_an_attribute_free_model_predicts_without_the_protected_columns(people_csv, tmp_path):
    checkpoint = _save(people_csv, tmp_path, "sex,race", "--method", "erm")
    rows = pd.read_csv(people_csv).drop(columns=["sex", "race", "label"])
    out = tmp_path / "scores.csv"
    rows.to_csv(tmp_path / "rows.csv", index=False)
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--csv", str(tmp_path / "rows.csv"),
                     "--out", str(out)]) == 0
    assert len(pd.read_csv(out)) == len(rows)
    assert checkpoint.sensitive == "sex,race"
