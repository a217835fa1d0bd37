"""``train --max-gap``: the search on validation, the feasibility rule, the outputs and the errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch

from groupmixnorm import cli
from groupmixnorm.data import Split
from groupmixnorm.experiments import constraint

#: A small, quick loop (50 optimizer steps of a width-8 network).
LOOP = ["--epochs", "5", "--iterations", "10", "--batch-size", "64", "--lr", "0.01", "--hidden", "8"]


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """600 rows, two features and a group that shifts one of them a little."""
    rng = np.random.default_rng(0)
    group = rng.choice(["a", "b"], 600)
    first, second = rng.normal(size=600) + 0.3 * (group == "a"), rng.normal(size=600)
    label = (first + second + rng.normal(scale=0.8, size=600) > 0.2).astype(int)
    path = tmp_path_factory.mktemp("table") / "rows.csv"
    pd.DataFrame({"x1": first, "x2": second, "group": group, "label": label}).to_csv(path, index=False)
    return path


def _argv(table, out, *extra):
    return ["train", "--csv", str(table), "--label", "label", "--sensitive", "group", *LOOP, "--quiet",
            "--out", str(out), *extra]


@pytest.fixture(scope="module")
def search_run(table, tmp_path_factory):
    """A search that meets its bound; the test split's scoring is counted."""
    out = tmp_path_factory.mktemp("search")
    calls = []
    original = constraint.score_test

    def counted(result, *args, **kwargs):
        calls.append(len(result.trials))
        return original(result, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constraint, "score_test", counted)
        code = cli.main(_argv(table, out, "--max-gap", "dp_gap_hard=0.3", "--methods", "gmn,gapreg", "--budget", "3",
                              "--save", str(out / "model.pt")))
    return code, out, calls


# --------------------------------------------------------------------------------------- a bound that holds


def test_a_bound_that_holds_writes_the_choice_its_test_numbers_and_the_front(search_run):
    code, out, _ = search_run
    assert code == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["chosen"]["method"] in ("gmn", "gapreg")
    assert record["chosen"]["knob"] in ("align", "lam")
    assert record["budget"] == 3 and record["trials"] == 6 and record["search_seconds"] > 0
    for split in ("validation", "test"):
        intervals = record[split]["intervals"]
        assert set(intervals) == {"ap", "accuracy", "dp_gap_hard"}
        assert all(v["low"] <= v["estimate"] <= v["high"] for v in intervals.values())
    assert record["validation"]["intervals"]["dp_gap_hard"]["high"] <= 0.3  # what feasible means
    assert record["held_on_test"] == {"dp_gap_hard": record["test"]["metrics"]["dp_gap_hard"] <= 0.3}
    front = pd.read_csv(out / "front.csv")
    assert len(front) == 6 and set(front["method"]) == {"gmn", "gapreg"}
    assert {"threshold", "val_ap", "val_accuracy", "val_dp_gap_hard", "val_dp_gap_hard_upper", "feasible"} <= set(front)
    chosen = front[front["chosen"]]
    assert len(chosen) == 1 and chosen["feasible"].all()
    assert chosen["val_accuracy"].iloc[0] == front[front["feasible"]]["val_accuracy"].max()  # the default objective
    feasible = front[front["feasible"]]
    assert (feasible["val_majority_p"] < constraint.USEFUL_LEVEL).all()  # every feasible one is of use
    assert (feasible["val_accuracy"] > feasible["val_majority_accuracy"]).all()
    assert (out / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_checkpoint_stores_the_chosen_threshold_and_predict_uses_it(search_run, table, tmp_path):
    from groupmixnorm.training.checkpoint import load_checkpoint

    _, out, _ = search_run
    threshold = json.loads((out / "metrics.json").read_text())["chosen"]["threshold"]
    checkpoint = load_checkpoint(out / "model.pt")
    assert checkpoint.threshold == threshold
    assert cli.main(["predict", "--checkpoint", str(out / "model.pt"), "--csv", str(table),
                     "--out", str(tmp_path / "given.csv"), "--threshold", "0.5"]) == 0
    given = pd.read_csv(tmp_path / "given.csv")
    assert (given["prediction"] == (given["score"] >= 0.5)).all()
    # A stored threshold that decides otherwise than 0.5 on these rows: one of the scores' quartiles.
    at_half = (given["score"] >= 0.5).sum()
    stored = next(q for q in given["score"].quantile([0.25, 0.5, 0.75]) if (given["score"] >= q).sum() != at_half)
    _rewrite_threshold(out / "model.pt", tmp_path / "model.pt", float(stored))
    assert cli.main(["predict", "--checkpoint", str(tmp_path / "model.pt"), "--csv", str(table),
                     "--out", str(tmp_path / "scores.csv")]) == 0
    scores = pd.read_csv(tmp_path / "scores.csv")
    assert np.array_equal(scores["score"], given["score"])
    assert (scores["prediction"] == (scores["score"] >= stored)).all()


def test_the_onnx_sidecar_carries_the_threshold_and_old_checkpoints_read_as_half(search_run, tmp_path):
    from groupmixnorm.training.checkpoint import load_checkpoint
    from groupmixnorm.export import preprocessing_spec

    _, out, _ = search_run
    _rewrite_threshold(out / "model.pt", tmp_path / "model.pt", 0.7)
    assert preprocessing_spec(load_checkpoint(tmp_path / "model.pt"))["threshold"] == 0.7
    _rewrite_threshold(out / "model.pt", tmp_path / "old.pt", None)
    assert load_checkpoint(tmp_path / "old.pt").threshold == 0.5


def test_one_method_with_its_options_can_be_searched_for_accuracy(table, tmp_path):
    argv = _argv(table, tmp_path, "--max-gap", "dp_gap_hard=0.3", "--method", "gapreg", "--fairness", "eo",
                 "--budget", "2", "--select", "accuracy")
    assert cli.main(argv) == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["select"] == "accuracy" and record["trials"] == 2
    assert record["chosen"]["method"] == "gapreg" and record["chosen"]["options"]["fairness"] == "eo"
    front = pd.read_csv(tmp_path / "front.csv")
    assert front[front["chosen"]]["val_accuracy"].iloc[0] == front[front["feasible"]]["val_accuracy"].max()


def _rewrite_threshold(source, target, threshold):
    payload = torch.load(source, weights_only=False)
    if threshold is None:
        del payload["threshold"]
    else:
        payload["threshold"] = threshold
    torch.save(payload, target)


# ------------------------------------------------------------------------------- the choice reads no test row


def test_the_test_split_is_scored_once_after_every_trial(search_run):
    _, _, calls = search_run
    assert calls == [6]


def test_the_search_never_hands_the_loop_the_test_split_and_ignores_it(table, monkeypatch):
    from groupmixnorm import training
    from groupmixnorm.experiments.spec import load_run_data
    from groupmixnorm.training import TrainConfig

    spec = {"dataset": "csv", "sensitive": "group", "protocol": "official", "config": {"seed": 0},
            "dataset_options": {"csv": str(table), "label": "label"}}
    data = load_run_data(spec)
    original = training.train
    seen = []

    def watched(method, given, config, **kwargs):
        seen.append(given.test is given.val)
        return original(method, given, config, **kwargs)

    monkeypatch.setattr(training, "train", watched)
    config = TrainConfig(epochs=3, iterations=5, batch_size=64, lr=0.01, hidden=(8,))
    first = constraint.search(data, {"gapreg": {}}, {"dp_gap_hard": 0.3}, config=config, budget=2)
    rng = np.random.default_rng(1)
    scrambled = Split(rng.normal(size=data.test.X.shape), rng.integers(0, 2, len(data.test)),
                      rng.integers(0, 2, len(data.test)))
    second = constraint.search(dataclasses.replace(data, test=scrambled), {"gapreg": {}}, {"dp_gap_hard": 0.3},
                               config=config, budget=2)
    assert len(seen) >= 4 and all(seen)  # every trial's models (cross-fitted here: the table is small)
    assert [t.row({"dp_gap_hard": 0.3}) | {"seconds": 0} for t in first.trials] == \
        [t.row({"dp_gap_hard": 0.3}) | {"seconds": 0} for t in second.trials]


# ------------------------------------------------------------------------------------ a bound never met


def test_a_bound_that_cannot_be_met_exits_3_with_one_line_naming_the_closest(table, tmp_path, capsys):
    capsys.readouterr()
    code = cli.main(_argv(table, tmp_path, "--max-gap", "dp_ks=0.001", "--methods", "gapreg", "--budget", "2"))
    err = capsys.readouterr().err.strip()
    assert code == 3
    assert len(err.splitlines()) == 1
    assert "no candidate of 2 met every bound" in err and "closest: gapreg lam=" in err
    assert "dp_ks upper end" in err and "> 0.001" in err
    assert not (tmp_path / "metrics.json").exists()
    assert len(pd.read_csv(tmp_path / "front.csv")) == 2 and not pd.read_csv(tmp_path / "front.csv")["feasible"].any()


# ------------------------------------------------------------------------------------- the feasibility rule


def test_a_point_gap_under_the_bound_is_not_enough_when_the_interval_reaches_over_it():
    # 100 rows per group; at threshold 0.5 group a selects 50 %, group b 46 %: a point gap of 0.04. The
    # labels agree with the decisions on 4 rows of 5, so the decisions beat the majority class.
    scores = np.r_[np.repeat([0.9, 0.1], 50), np.repeat([0.9, 0.1], [46, 54])]
    groups = np.repeat([0, 1], 100)
    labels = np.where(np.arange(200) % 5 == 0, scores < 0.5, scores >= 0.5).astype(int)
    choose = lambda bound: constraint.choose_threshold(labels, scores, groups, {"dp_gap_hard": bound}, seed=0,
                                                       thresholds=[0.5])
    tight = choose(0.05)
    assert tight.gaps["dp_gap_hard"] == pytest.approx(0.04) and tight.upper["dp_gap_hard"] > 0.05
    assert not tight.feasible
    loose = choose(tight.upper["dp_gap_hard"])
    assert loose.feasible and loose.threshold == 0.5


def test_a_threshold_that_decides_nothing_is_never_feasible():
    scores = np.r_[np.full(50, 0.9), np.full(50, 0.1)]
    groups, labels = np.repeat([0, 1], 50), np.tile([1, 0], 50)
    choice = constraint.choose_threshold(labels, scores, groups, {"dp_gap_hard": 0.5}, seed=0,
                                         thresholds=[0.05, 0.95])
    assert not choice.feasible  # both thresholds give every row one prediction (a gap of 0 for free)


def _judged(split, scores, threshold, folds=1):
    """A search result whose one (chosen) trial decided ``split`` at ``threshold`` with ``scores``."""
    choice = constraint.ThresholdChoice(threshold, 0.0, 0.0, {}, {}, 1.0, 0.0, True)
    trial = constraint.Trial("erm", None, None, choice, 0.0)
    return constraint.SearchResult([trial], trial, None, None, None, 0.0, folds, split, scores, threshold)


def test_weak_models_are_warned_about_on_the_rows_they_were_judged_on():
    split = Split(np.zeros((4, 1)), np.array([1, 1, 1, 0]), np.array([0, 1, 0, 1]))
    lines = constraint.weak_model_warnings(_judged(split, np.array([0.6, 0.6, 0.61, 0.6]), 0.5))
    assert len(lines) == 2 and "validation" in lines[0]
    assert "no better than predicting the majority class (0.7500)" in lines[0] and "collapsed" in lines[1]
    assert constraint.weak_model_warnings(_judged(split, np.array([0.9, 0.8, 0.7, 0.1]), 0.5)) == []
    crossed = constraint.weak_model_warnings(_judged(split, np.array([0.6, 0.6, 0.61, 0.6]), 0.5, folds=5))
    assert "out-of-fold" in crossed[0]


def test_auto_searches_the_methods_that_need_no_attribute_and_can_be_saved():
    names = constraint.auto_methods()
    assert "expgrad" not in names and {"gmn", "gapreg", "erm"} <= set(names)


# ------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, message", [
    ("dp_gap_hard", "takes METRIC=BOUND"),
    ("=0.1", "takes METRIC=BOUND"),
    ("accuracy=0.1", "'accuracy' is not a gap metric"),
    ("dp_ratio=0.8", "'dp_ratio' is not a gap metric"),
    ("dp_gap_hard=abc", "the bound 'abc' is not a number"),
    ("dp_gap_hard=1.5", "the bound must be in [0, 1], got 1.5"),
    ("dp_gap_hard=-0.1", "the bound must be in [0, 1], got -0.1"),
    ("dp_gap_hard=nan", "the bound must be in [0, 1], got nan"),
])
def test_bad_max_gap_strings_are_one_line_errors(table, tmp_path, capsys, text, message):
    assert cli.main(_argv(table, tmp_path, "--max-gap", text)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "--max-gap" in err


@pytest.mark.parametrize("extra, message", [
    (["--max-gap", "dp_gap_hard=0.1", "--max-gap", "dp_gap_hard=0.2"], "names dp_gap_hard twice"),
    (["--max-gap", "dp_gap_hard=0.1", "--methods", "gmn,nope"], "unknown method(s) nope"),
    (["--max-gap", "dp_gap_hard=0.1", "--method", "gmn", "--align", "2"], "--align is what --max-gap searches"),
    (["--max-gap", "dp_gap_hard=0.1", "--method", "gmn", "--eval-mode", "group"], "needs the protected attribute"),
    (["--max-gap", "dp_gap_hard=0.1", "--methods", "gmn", "--lam", "1"], "apply to a single --method"),
    (["--max-gap", "dp_gap_hard=0.1", "--methods", "gmn", "--method", "gapreg"], "not both"),
    (["--max-gap", "dp_gap_hard=0.1", "--select", "last"], "ap or accuracy, got last"),
    (["--max-gap", "dp_gap_hard=0.1", "--budget", "0"], "--budget must be at least 1"),
    (["--max-gap", "dp_gap_hard=0.1", "--methods", "expgrad", "--save", "m.pt"], "expgrad models are not saved"),
    (["--budget", "3"], "--budget applies to a --max-gap search"),
    (["--select", "accuracy"], "--select accuracy is the objective of a --max-gap search"),
])
def test_flags_that_do_not_fit_a_search_are_one_line_errors(table, tmp_path, capsys, extra, message):
    assert cli.main(_argv(table, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "front.csv").exists()


# ------------------------------------------------------------------ monotone and non-monotone knobs (faked)


def _fake_trials(monkeypatch, gap_of):
    """Trials that train nothing: a knob value's validation AP and accuracy fall with the value (a stronger
    knob costs accuracy, which stays above the majority class) and its gap is ``gap_of(value)``; feasible
    when the gap is at most 0.05."""
    def fit(data, config, bounds, name, options, keep, crossing):
        value = options["lam"]
        gap = gap_of(value)
        accuracy = 0.7 + 0.1 / (1.0 + value)
        choice = constraint.ThresholdChoice(0.5, 1.0 / (1.0 + value), accuracy, {"dp_gap_hard": gap},
                                            {"dp_gap_hard": gap}, 0.001, 0.6, gap <= 0.05)
        return constraint.TrialFit(choice, 0.0, "", (lambda split: None, None, None))

    monkeypatch.setattr(constraint, "fit_trial", fit)


def _search(budget):
    from groupmixnorm.training import TrainConfig

    return constraint.search(_dataset(10), {"gapreg": {}}, {"dp_gap_hard": 0.05}, config=TrainConfig(seed=0),
                             budget=budget, cross_fit=1)


def test_a_monotone_knob_is_searched_to_its_feasible_side(monkeypatch):
    _fake_trials(monkeypatch, lambda value: 0.2 / value)  # falls with the knob; feasible from 4 up
    result = _search(20)
    feasible = [trial for trial in result.trials if trial.feasible]
    assert feasible and result.chosen.value >= 4.0
    assert result.chosen.value == min(trial.value for trial in feasible)  # the weakest feasible: the most accurate


def test_a_knob_whose_gap_is_not_monotone_is_still_searched_where_it_is_met(monkeypatch):
    # Met only between 0.5 and 5: both ends of the range (0.1, 30) miss it, so bisection on the knob would
    # stop at "infeasible"; TPE's random start (10 draws over 40 % of the log range) reaches the middle.
    gap = lambda value: 0.02 if 0.5 <= value <= 5.0 else 0.3
    knob = constraint.KNOBS["gapreg"]
    assert gap(knob.low) > 0.05 and gap(knob.high) > 0.05
    _fake_trials(monkeypatch, gap)
    result = _search(20)
    assert result.chosen is not None and 0.5 <= result.chosen.value <= 5.0
    assert result.chosen.value == min(trial.value for trial in result.trials if trial.feasible)


def test_a_decision_that_departs_from_the_majority_on_a_few_rows_is_not_of_use():
    """Four departures from the majority class, all right, are what four fair coins give once in sixteen:
    the sign test refuses them, however much a bootstrap of the accuracy would admit; forty right of fifty
    pass. A decision that never departs is never of use."""
    from groupmixnorm.metrics.sanity import beats_majority_pvalue

    labels = np.r_[np.ones(140), np.zeros(60)].astype(int)  # the majority class is 1, accuracy 0.70
    few = np.r_[np.ones(140), np.zeros(4), np.ones(56)]  # predicts 0 on 4 rows, all of them 0
    assert beats_majority_pvalue(labels, few) == pytest.approx(1 / 16)
    many = np.r_[np.ones(130), np.zeros(10 + 40), np.ones(20)]  # 50 departures: 40 right, 10 wrong
    assert beats_majority_pvalue(labels, many) < 1e-4
    assert beats_majority_pvalue(labels, np.ones(200)) == 1.0
    groups = np.tile([0, 1], 100)
    for scores, useful in ((few, False), (many, True)):
        choice = constraint.choose_threshold(labels, scores, groups, {"dp_gap_hard": 1.0}, seed=0, thresholds=[0.5])
        assert choice.feasible == useful and choice.accuracy > choice.majority


# ------------------------------------------------------------------------------------------- cross-fitting


def _dataset(val_rows_per_group, *, train_rows=200, seed=0):
    """Two groups; the validation split holds ``val_rows_per_group`` rows of each."""
    from groupmixnorm.data.tabular import TabularDataset

    rng = np.random.default_rng(seed)

    def split(per_group):
        a = np.repeat([0, 1], per_group)
        X = rng.normal(size=(2 * per_group, 3)).astype(np.float32) + 0.5 * a[:, None]
        y = (X[:, 0] + rng.normal(scale=0.7, size=len(a)) > 0.3).astype(np.int64)
        return Split(X, y, a.astype(np.int64))

    return TabularDataset("toy", split(train_rows // 2), split(val_rows_per_group), split(50), ["x0", "x1", "x2"],
                          "group", ["a", "b"], "official", None)


def test_auto_cross_fits_only_a_validation_split_with_a_group_under_100_rows():
    assert constraint.resolve_folds(_dataset(99)) == constraint.CROSS_FIT_FOLDS == 5
    assert constraint.resolve_folds(_dataset(100)) == 1
    assert constraint.resolve_folds(_dataset(100), 3) == 3 and constraint.resolve_folds(_dataset(40), 1) == 1
    for bad in (0, -2, 2.5, True, "five"):
        with pytest.raises(ValueError, match="'auto' or a whole number of folds"):
            constraint.resolve_folds(_dataset(40), bad)


def test_the_folds_cover_every_training_and_validation_row_once_stratified_by_label_and_group():
    data = _dataset(30)
    crossing = constraint.CrossFit.of(data, 5, seed=3)
    rows = constraint.pooled_rows(data)
    assert len(crossing.fold) == len(data.train) + len(data.val) == len(rows) and crossing.folds == 5
    cells = rows.y * 2 + rows.a
    for cell in np.unique(cells):
        per_fold = np.bincount(crossing.fold[cells == cell], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1 and per_fold.min() >= 1
    assert np.array_equal(crossing.fold, constraint.CrossFit.of(data, 5, seed=3).fold)  # seeded
    assert not np.array_equal(crossing.fold, constraint.CrossFit.of(data, 5, seed=4).fold)


def test_a_cell_with_fewer_rows_than_folds_is_refused_by_name():
    data = _dataset(30)
    rows = constraint.pooled_rows(data)
    keep = ~((rows.a == 1) & (rows.y == 0))
    keep[np.flatnonzero(~keep)[:3]] = True  # three rows of group b with label 0 are left
    few = dataclasses.replace(data, train=Split(rows.X[keep][:-60], rows.y[keep][:-60], rows.a[keep][:-60]),
                              val=Split(rows.X[keep][-60:], rows.y[keep][-60:], rows.a[keep][-60:]))
    with pytest.raises(ValueError, match="cannot cross-fit 5 folds: group 'b' with label 0 has 3 rows"):
        constraint.CrossFit.of(few, 5, seed=0)


def test_a_cross_fitted_trial_is_judged_on_out_of_fold_scores_and_its_model_decides_at_their_share():
    from groupmixnorm.methods import make_method
    from groupmixnorm.training import TrainConfig

    data = _dataset(30)
    config = TrainConfig(epochs=3, iterations=5, batch_size=32, lr=0.01, hidden=(8,), seed=1)
    bounds = {"dp_gap_hard": 0.5}
    result = constraint.search(data, {"erm": {}}, bounds, config=config, budget=1)
    rows = constraint.pooled_rows(data)
    assert result.folds == 5 and len(result.judged_on) == len(rows)
    out_of_fold = constraint.CrossFit.of(data, 5, config.seed).scores("erm", {}, data, config, rows)
    assert len(out_of_fold.epochs) == 5 and all(1 <= epochs <= config.epochs for epochs in out_of_fold.epochs)
    assert result.fold_epochs == out_of_fold.epochs
    trial, = result.trials
    assert trial.choice == constraint.choose_threshold(rows.y, out_of_fold.scores, rows.a, bounds, seed=config.seed)
    assert np.array_equal(result.judged_scores, out_of_fold.scores)
    # The model: the holdout search's, trained on the training split with early stopping on validation.
    scorer = constraint.fit_candidate(make_method("erm"), data, config).scorer
    assert result.chosen is trial and np.array_equal(result.scorer(data.test), scorer(data.test))
    # Its threshold accepts the share of the pooled rows that the out-of-fold decisions accepted.
    share = np.mean(out_of_fold.scores >= trial.choice.threshold)
    assert abs(np.mean(scorer(rows) >= result.threshold) - share) <= 0.5 / len(rows) + 1e-12 or \
        np.sum(scorer(rows) == result.threshold) > 1  # only tied scores can move the share further
    holdout = constraint.search(data, {"erm": {}}, bounds, config=config, budget=1, cross_fit=1)
    assert holdout.folds == 1 and holdout.judged_on is data.val
    assert holdout.trials[0].choice == constraint.choose_threshold(data.val.y, scorer(data.val), data.val.a, bounds,
                                                                   seed=config.seed)
    assert holdout.threshold == holdout.trials[0].choice.threshold and holdout.fold_epochs is None
    assert "out-of-fold" in constraint.judged_on_text(result) and "share" in constraint.judged_on_text(result)
    assert "validation split" in constraint.judged_on_text(holdout)


def test_the_rate_threshold_accepts_the_share_asked_for():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
    for share, accepted in ((1.0, 5), (0.6, 3), (0.5, 2), (0.2, 1), (0.0, 0)):  # 0.5 of 5 rounds to 2 (even)
        threshold = constraint.rate_threshold(scores, share)
        assert np.sum(scores >= threshold) == accepted


def test_the_cross_fit_flag_is_said_and_checked(table, tmp_path, capsys):
    capsys.readouterr()
    argv = _argv(table, tmp_path, "--max-gap", "dp_gap_hard=0.3", "--methods", "erm")
    assert cli.main([a for a in argv if a != "--quiet"] + ["--cross-fit", "auto"]) == 0
    assert "cross-fitting 5 folds over the training and validation rows" in capsys.readouterr().err
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert "out-of-fold" in record["judged_on"]
    assert cli.main([*argv, "--cross-fit", "1"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["judged_on"].startswith("the validation split")
    for bad in ("0", "five"):
        assert cli.main([*argv, "--cross-fit", bad]) == 2
        assert "--cross-fit" in capsys.readouterr().err
    assert cli.main(_argv(table, tmp_path, "--cross-fit", "3")) == 2
    assert "--cross-fit applies to a --max-gap search" in capsys.readouterr().err
