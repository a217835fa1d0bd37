"""The scikit-learn estimator: fairness, scikit-learn's own checks, pipelines, metadata routing, fairlearn."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn
import torch
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import check_estimator, parametrize_with_checks

from groupmixnorm.metrics import dp_gap
from groupmixnorm.sklearn import GroupMixNormClassifier, NoSensitiveFeaturesWarning

README = Path(__file__).resolve().parents[1] / "README.md"

#: scikit-learn checks that do not run, and why (the README lists the same).
SKIPPED_CHECKS = {
    "check_array_api_input": "the network runs in torch on numpy input; array API namespaces are not supported "
                             "(scikit-learn skips the check unless SCIPY_ARRAY_API=1)",
}


def biased(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features where one column is a proxy of the group, and base rates that differ by group."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 2, n)
    y = (rng.random(n) < np.where(a == 1, 0.6, 0.25)).astype(int)
    X = np.column_stack([y + rng.normal(0, 1.0, n), a + rng.normal(0, 0.3, n), rng.normal(0, 1, (n, 3))])
    return X, y, np.where(a == 1, "M", "F")


@parametrize_with_checks([GroupMixNormClassifier(random_state=0)])
def test_scikit_learn_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoSensitiveFeaturesWarning)  # the checks fit without the attribute
        check(estimator)


def test_only_the_listed_checks_are_skipped_and_none_fail():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = check_estimator(GroupMixNormClassifier(random_state=0), on_fail=None, on_skip=None)
    status = {result["check_name"]: result["status"] for result in results}
    assert {name for name, state in status.items() if state == "skipped"} == set(SKIPPED_CHECKS)
    assert not [name for name, state in status.items() if state == "failed"]
    assert status["check_classifier_not_supporting_multiclass"] == "passed"  # the binary-only tag is honoured


def test_readme_lists_the_skipped_checks():
    text = README.read_text(encoding="utf-8")
    for name in SKIPPED_CHECKS:
        assert f"`{name}`" in text


def test_gmn_closes_the_gap_that_erm_leaves_and_predicts_without_the_attribute():
    X, y, a = biased()
    X_test, y_test, a_test = biased(seed=1)
    gaps = {}
    for method in ("erm", "gmn"):
        model = GroupMixNormClassifier(method, random_state=0).fit(X, y, sensitive_features=a)
        gaps[method] = dp_gap(model.predict_proba(X_test)[:, 1], a_test)
        assert model.score(X_test, y_test) > 0.6
    assert gaps["erm"] > 0.2 and gaps["gmn"] < 0.05
    assert list(model.groups_) == ["F", "M"]


def test_outputs_agree_with_each_other_and_with_string_labels():
    X, y, a = biased()
    labels = np.where(y == 1, "yes", "no")
    model = GroupMixNormClassifier(random_state=0, epochs=5).fit(X, labels, sensitive_features=a)
    logits, proba = model.decision_function(X), model.predict_proba(X)
    assert list(model.classes_) == ["no", "yes"]
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-logits)))
    assert (model.predict(X) == np.where(logits > 0, "yes", "no")).all()


def test_same_seed_same_model_and_the_global_random_state_is_left_alone():
    X, y, a = biased()
    np.random.seed(5)
    import torch

    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    first = GroupMixNormClassifier(random_state=3, epochs=3).fit(X, y, sensitive_features=a).decision_function(X)
    assert torch.rand(1) == before
    second = GroupMixNormClassifier(random_state=3, epochs=3).fit(X, y, sensitive_features=a).decision_function(X)
    np.testing.assert_array_equal(first, second)


def test_fit_without_the_attribute_warns_and_trains_one_group():
    X, y, _ = biased()
    with pytest.warns(NoSensitiveFeaturesWarning, match="one group"):
        model = GroupMixNormClassifier(random_state=0, epochs=3).fit(X, y)
    assert list(model.groups_) == [None]


def test_several_sensitive_columns_make_intersectional_groups():
    X, y, a = biased()
    other = np.where(np.arange(len(y)) % 2 == 0, "x", "y")
    model = GroupMixNormClassifier(random_state=0, epochs=2)
    model.fit(X, y, sensitive_features=pd.DataFrame({"a": a, "b": other}))
    assert list(model.groups_) == ["F & x", "F & y", "M & x", "M & y"]


@pytest.mark.parametrize("params, message", [
    ({"method": "expgrad"}, "method must be one of"),
    ({"method_options": {"eval_mode": "group"}}, "needs the protected attribute at prediction"),
    ({"method_options": {"nonsense": 1}}, "no option"),
])
def test_bad_parameters_are_refused_at_fit(params, message):
    X, y, a = biased(n=50)
    with pytest.raises(ValueError, match=message):
        GroupMixNormClassifier(**params).fit(X, y, sensitive_features=a)


def test_other_methods_take_their_options():
    X, y, a = biased()
    model = GroupMixNormClassifier("gapreg", method_options={"lam": 2.0}, random_state=0, epochs=2)
    model.fit(X, y, sensitive_features=a)
    assert model.method_.name == "gapreg" and model.method_.lam == 2.0 and model.method_.fairness == "dp"


def test_clone_and_pickle_keep_the_model():
    X, y, a = biased()
    model = GroupMixNormClassifier(random_state=0, epochs=2, hidden=(8,)).fit(X, y, sensitive_features=a)
    assert clone(model).get_params() == model.get_params()
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.decision_function(X), model.decision_function(X))


def test_grid_search_routes_sensitive_features_to_each_fit():
    X, y, a = biased()
    with sklearn.config_context(enable_metadata_routing=True):
        estimator = GroupMixNormClassifier(random_state=0, epochs=3).set_fit_request(sensitive_features=True)
        search = GridSearchCV(estimator, {"align": [0.0, 1.0]}, cv=2, scoring="accuracy")
        search.fit(X, y, sensitive_features=a)
        assert list(search.best_estimator_.groups_) == ["F", "M"]
        assert search.cv_results_["mean_test_score"].min() > 0.5
        unrequested = GridSearchCV(GroupMixNormClassifier(epochs=1), {"align": [0.0]}, cv=2)
        with pytest.raises(Exception, match="sensitive_features"):
            unrequested.fit(X, y, sensitive_features=a)


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    return re.search(r"## scikit-learn estimator\n.*?```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_readme_pipeline_example_runs_and_metricframe_sees_groups():
    namespace: dict = {}
    exec(compile(_readme_example(), str(README), "exec"), namespace)
    by_group = namespace["rates"].by_group
    assert list(by_group.index) == ["Female", "Male"]
    assert 0.0 < by_group.min() and by_group.max() < 1.0
    # The selection rates MetricFrame reports are those of the predictions, made without the attribute.
    predicted, sex = namespace["predicted"], namespace["sex_test"].to_numpy()
    for group, rate in by_group.items():
        assert rate == pytest.approx(np.mean(predicted[sex == group] == ">50K"))
    assert namespace["model"].score(namespace["X_test"], namespace["y_test"]) > 0.75


def test_a_pipeline_in_grid_search_routes_sensitive_features_to_its_last_step():
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    X, y, a = biased()
    with sklearn.config_context(enable_metadata_routing=True):
        model = make_pipeline(StandardScaler(), GroupMixNormClassifier(random_state=0, epochs=3))
        model[-1].set_fit_request(sensitive_features=True)
        search = GridSearchCV(model, {"groupmixnormclassifier__align": [0.0, 1.0]}, cv=2)
        search.fit(X, y, sensitive_features=a)
    assert list(search.best_estimator_[-1].groups_) == ["F", "M"]


def test_sensitive_features_of_the_wrong_length_or_with_gaps_are_refused():
    X, y, a = biased(n=40)
    with pytest.raises(ValueError, match="sensitive_features has 39 rows, X has 40"):
        GroupMixNormClassifier(epochs=1).fit(X, y, sensitive_features=a[:-1])
    with pytest.raises(ValueError, match="missing values"):
        GroupMixNormClassifier(epochs=1).fit(X, y, sensitive_features=pd.Series(a).where(a == "M"))


@pytest.mark.parametrize("threads", [1, 3])
def test_fit_trains_on_the_thread_count_it_is_given_and_restores_torch_s(monkeypatch, threads):
    """The command line's policy for tables (one thread unless told otherwise), not torch's default."""
    import groupmixnorm.sklearn as module

    seen = []
    original = module._train_network

    def recording(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "_train_network", recording)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        X, y, a = biased()
        options = {} if threads == 1 else {"threads": threads}
        GroupMixNormClassifier("erm", epochs=1, random_state=0, **options).fit(X, y, sensitive_features=a)
        assert seen == [threads]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_thread_count_below_one_is_refused():
    X, y, a = biased()
    with pytest.raises(ValueError, match="threads must be a whole number of at least 1"):
        GroupMixNormClassifier("erm", epochs=1, threads=0).fit(X, y, sensitive_features=a)
