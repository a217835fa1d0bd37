"""``FairSearchCV``: the command line's ``--max-gap`` search as a scikit-learn estimator."""

from __future__ import annotations

import pickle
import random

import numpy as np
import pandas as pd
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from groupmixnorm.experiments.constraint import NoFeasibleModel
from groupmixnorm.sklearn import FairSearchCV, NoFeasibleModelError

#: A tiny loop: 30 optimizer steps of a width-8 network per trial.
LOOP = {"hidden": (8,), "epochs": 3, "iterations": 10, "batch_size": 64, "lr": 0.01}
#: A bound every trial meets (a gap is at most 1), so feasibility does not hang on how training went.
ANY_GAP = {"dp_gap_hard": 1.0}


@pytest.fixture(scope="module")
def rows(planted):
    """The planted train and validation splits as one table (2000 rows), with string labels."""
    X = np.vstack([planted.train.X, planted.val.X])
    y = np.where(np.r_[planted.train.y, planted.val.y] == 1, "yes", "no")
    a = np.where(np.r_[planted.train.a, planted.val.a] == 1, "g1", "g0")
    return X, y, a


def test_a_bound_that_holds_keeps_the_best_feasible_trial_and_predicts_without_the_attribute(rows):
    X, y, a = rows
    bound = 0.25
    python, legacy, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    search = FairSearchCV({"dp_gap_hard": bound}, methods=["erm", "gmn"], budget=2, **LOOP).fit(
        X, y, sensitive_features=a)
    assert random.getstate() == python and torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], legacy[1])
    results, best = search.cv_results_, search.best_index_
    assert list(results["method"]) == ["erm", "gmn", "gmn"] and list(results["knob"]) == ["", "align", "align"]
    assert np.isnan(results["value"][0]) and (results["value"][1:] > 0).all()
    assert results["feasible"][best] and results["chosen"][best] and results["chosen"].sum() == 1
    assert results["val_dp_gap_hard_upper"][best] <= bound  # what feasible means
    assert results["val_accuracy"][best] == results["val_accuracy"][results["feasible"]].max() == search.best_score_
    assert search.best_method_ == results["method"][best]
    assert search.threshold_ == results["threshold"][best] == search.best_params_["threshold"]
    knob = results["knob"][best]
    knob_value = {} if not knob else {knob: results["value"][best]}
    assert search.best_params_ == knob_value | {"threshold": search.threshold_}
    assert search.search_seconds_ > 0 and search.n_features_in_ == 4
    assert list(search.classes_) == ["no", "yes"] and list(search.groups_) == ["g0", "g1"]
    proba = search.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-search.decision_function(X))))
    assert (search.predict(X) == np.where(proba[:, 1] >= search.threshold_, "yes", "no")).all()


def test_a_bound_that_cannot_be_met_raises_one_line_naming_the_closest(rows):
    X, y, a = rows
    # A KS distance of 0 in every bootstrap resample needs one score for every row, and a threshold that
    # then gives every row the same prediction is never feasible.
    search = FairSearchCV({"dp_ks": 0.0}, methods="gmn", budget=2, **LOOP)
    with pytest.raises(NoFeasibleModelError) as raised:
        search.fit(X, y, sensitive_features=a)
    message = str(raised.value)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, NoFeasibleModel)
    assert len(message.splitlines()) == 1
    assert "no candidate of 2 met every bound" in message and "closest: gmn align=" in message
    assert "dp_ks upper end" in message and "> 0.0" in message
    assert len(raised.value.cv_results["method"]) == 2 and not raised.value.cv_results["feasible"].any()
    with pytest.raises(NotFittedError):
        check_is_fitted(search)
    fitted = FairSearchCV(ANY_GAP, methods="erm", **LOOP).fit(X, y, sensitive_features=a)
    with pytest.raises(NoFeasibleModelError):
        fitted.set_params(max_gap={"dp_ks": 0.0}).fit(X, y, sensitive_features=a)
    with pytest.raises(NotFittedError):  # a failed refit leaves no model of the earlier fit behind
        fitted.predict(X)


def test_several_sensitive_columns_make_intersectional_groups(rows):
    X, y, a = rows
    other = np.where(np.arange(len(y)) % 2 == 0, "x", "y")
    search = FairSearchCV(ANY_GAP, methods="erm", **LOOP)
    search.fit(X, y, sensitive_features=pd.DataFrame({"a": a, "b": other}))
    assert list(search.groups_) == ["g0 & x", "g0 & y", "g1 & x", "g1 & y"]
    assert search.best_params_ == {"threshold": search.threshold_} and len(search.cv_results_["method"]) == 1


@pytest.mark.parametrize("params, fit_options, message", [
    ({"max_gap": {"accuracy": 0.1}}, {}, r"max_gap\['accuracy'\]: 'accuracy' is not a gap metric; choose from"),
    ({"max_gap": {"dp_gap_hard": -0.1}}, {}, r"max_gap\['dp_gap_hard'\]: the bound must be in \[0, 1\], got -0.1"),
    ({"max_gap": {"dp_gap": "x"}}, {}, r"max_gap\['dp_gap'\]: the bound 'x' is not a number"),
    ({"max_gap": {}}, {}, "max_gap must be a non-empty dict"),
    ({"max_gap": ANY_GAP, "methods": ["gmn", "expgrad"]}, {}, "methods must be 'auto' or names among"),
    ({"max_gap": ANY_GAP, "methods": []}, {}, "methods must be 'auto' or names among"),
    ({"max_gap": ANY_GAP, "val_fraction": 1.0}, {}, r"val_fraction must be in \(0, 1\), got 1.0"),
    ({"max_gap": ANY_GAP, "budget": 0}, {}, "budget must be a whole number of trials, at least 1, got 0"),
    ({"max_gap": ANY_GAP}, {"sensitive_features": None}, "FairSearchCV.fit needs sensitive_features"),
    ({"max_gap": ANY_GAP, "n_jobs": 0}, {}, "n_jobs must be None, -1 or a whole number of at least 1, got 0"),
])
def test_bad_parameters_are_one_line_errors_before_anything_trains(rows, params, fit_options, message):
    X, y, a = rows
    with pytest.raises(ValueError, match=message) as raised:
        FairSearchCV(**{**params, **LOOP}).fit(X, y, **{"sensitive_features": a, **fit_options})
    assert len(str(raised.value).splitlines()) == 1


def test_worker_processes_find_the_same_model(rows):
    X, y, a = rows
    searches = [FairSearchCV({"dp_gap_hard": 0.25}, methods=["erm", "gapreg"], budget=2, n_jobs=jobs, **LOOP)
                .fit(X, y, sensitive_features=a) for jobs in (None, 2)]
    here, workers = (search.cv_results_ for search in searches)
    for column in set(here) - {"seconds"}:
        np.testing.assert_array_equal(workers[column], here[column], err_msg=column)
    np.testing.assert_array_equal(searches[1].predict_proba(X), searches[0].predict_proba(X))


def test_a_pipeline_passes_sensitive_features_with_and_without_metadata_routing(rows):
    X, y, a = rows
    legacy = make_pipeline(StandardScaler(), FairSearchCV(ANY_GAP, methods="erm", **LOOP))
    legacy.fit(X, y, fairsearchcv__sensitive_features=a)
    with sklearn.config_context(enable_metadata_routing=True):
        routed = make_pipeline(StandardScaler(), FairSearchCV(ANY_GAP, methods="erm", **LOOP))
        routed[-1].set_fit_request(sensitive_features=True)
        routed.fit(X, y, sensitive_features=a)
    assert list(routed[-1].groups_) == ["g0", "g1"]
    assert set(routed.predict(X)) <= {"no", "yes"}
    np.testing.assert_array_equal(routed.predict_proba(X), legacy.predict_proba(X))


def test_clone_gives_an_unfitted_copy_that_refits_to_the_same_model_and_pickle_keeps_it(rows):
    X, y, a = rows
    search = FairSearchCV(ANY_GAP, methods=["erm", "gapreg"], budget=1, **LOOP).fit(X, y, sensitive_features=a)
    copy = clone(search)
    assert copy.get_params() == search.get_params()
    with pytest.raises(NotFittedError):
        copy.predict(X)
    copy.fit(X, y, sensitive_features=a)
    for key in ("method", "value", "threshold", "val_ap", "val_dp_gap_hard_upper"):
        np.testing.assert_array_equal(copy.cv_results_[key], search.cv_results_[key])
    np.testing.assert_array_equal(copy.decision_function(X), search.decision_function(X))
    restored = pickle.loads(pickle.dumps(search))
    np.testing.assert_array_equal(restored.predict(X), search.predict(X))


def test_a_small_validation_part_is_cross_fitted_unless_told_otherwise(rows):
    X, y, a = rows
    # 600 rows hold out 150 for validation, some 75 per group: under 100, so "auto" cross-fits 5 folds.
    small = slice(0, 600)
    auto = FairSearchCV(ANY_GAP, methods=["erm"], budget=1, **LOOP).fit(X[small], y[small], sensitive_features=a[small])
    holdout = FairSearchCV(ANY_GAP, methods=["erm"], budget=1, cross_fit=1, **LOOP).fit(
        X[small], y[small], sensitive_features=a[small])
    assert auto.n_splits_ == 5 and holdout.n_splits_ == 1
    # Both train the chosen setting on the training part; the cross-fitted one decides at the out-of-fold share.
    assert np.array_equal(auto.decision_function(X), holdout.decision_function(X))
    assert auto.best_params_["threshold"] == auto.threshold_ and 0.0 <= auto.threshold_ <= 1.0
    assert FairSearchCV(ANY_GAP, methods=["erm"], budget=1, **LOOP).fit(X, y, sensitive_features=a).n_splits_ == 1
    with pytest.raises(ValueError, match="'auto' or a whole number of folds"):
        FairSearchCV(ANY_GAP, methods=["erm"], cross_fit=0, **LOOP).fit(X[small], y[small], sensitive_features=a[small])
