"""fairlearn's ThresholdOptimizer over the ERM network: a reference that reads the attribute at prediction."""

from __future__ import annotations

import numpy as np
import pytest

from groupmixnorm.experiments.constraint import auto_methods
from groupmixnorm.methods import METHODS, make_method
from groupmixnorm.metrics import dp_gap_hard
from groupmixnorm.sklearn import GroupMixNormClassifier
from groupmixnorm.training import TrainConfig, train

CONFIG = TrainConfig(epochs=4, iterations=40, batch_size=128, hidden=(16,), seed=0)


def _rate_gap(scores: np.ndarray, a: np.ndarray) -> float:
    """The gap of the randomized classifier's expected selection rates (mean selection probability per group)."""
    rates = [scores[a == g].mean() for g in np.unique(a)]
    return float(max(rates) - min(rates))


@pytest.fixture(scope="module")
def plain_scores(planted):
    return train(make_method("erm"), planted, CONFIG).test_scores


@pytest.mark.parametrize("tol", [0.0, 0.1])
def test_the_fitted_thresholds_bound_the_training_gap(planted, tol: float) -> None:
    scorer = make_method("thresholdopt", tol=tol).fit_outside_loop(planted, CONFIG)
    scores = scorer(planted.train.X, planted.train.a)
    assert scores.shape == (len(planted.train),) and np.all((scores >= 0) & (scores <= 1))
    # fairlearn equalizes the expected rates on the data it is fitted on, up to its grid of 1000 rates.
    assert _rate_gap(scores, planted.train.a) <= tol + 0.01


def test_it_shrinks_the_test_gap_of_the_network_it_post_processes(planted, plain_scores) -> None:
    result = train(make_method("thresholdopt"), planted, CONFIG)
    assert result.model is None and result.selected_epoch == 0
    # Both are gaps of selection rates: ERM's decisions at 0.5, and the randomized thresholds' expected ones.
    plain_gap = dp_gap_hard(plain_scores, planted.test.a)
    assert plain_gap > 0.2  # the planted bias
    assert _rate_gap(result.test_scores, planted.test.a) < plain_gap / 3


def test_scores_depend_on_the_attribute(planted) -> None:
    scorer = make_method("thresholdopt").fit_outside_loop(planted, CONFIG)
    X, a = planted.test.X, planted.test.a
    assert not np.array_equal(scorer(X, a), scorer(X, 1 - a))


def test_it_is_a_reference_that_cannot_be_saved_or_served_without_the_attribute() -> None:
    method = make_method("thresholdopt")
    assert METHODS["thresholdopt"].fitted_outside_loop and method.uses_sensitive_at_prediction()
    assert "thresholdopt" not in auto_methods()
    with pytest.raises(ValueError, match="method must be one of"):
        GroupMixNormClassifier(method="thresholdopt")._make_method()


@pytest.mark.parametrize("options", [{"tol": -0.1}, {"tol": 1.0}, {"fairness": "eo", "tol": 0.1}, {"fairness": "x"}])
def test_invalid_options_raise(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_method("thresholdopt", **options)
