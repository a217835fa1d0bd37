"""The ``expgrad`` outside peer: fairlearn's exponentiated gradient over logistic regression."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from torch import nn

from groupmixnorm.cli import main
from groupmixnorm.data import Split, TabularDataset
from groupmixnorm.methods import METHODS, ExponentiatedGradientMethod, make_method
from groupmixnorm.metrics import dp_gap, dp_gap_hard
from groupmixnorm.training import TrainConfig, train


@pytest.fixture(scope="module")
def dp_scorer(planted):
    return ExponentiatedGradientMethod(fairness="dp", max_iter=20).fit_outside_loop(planted, TrainConfig(seed=0))


def test_registered_with_options() -> None:
    assert METHODS["expgrad"] is ExponentiatedGradientMethod
    method = make_method("expgrad", fairness="eo", eps=0.02, max_iter=5)
    assert method.options() == {"fairness": "eo", "eps": 0.02, "max_iter": 5}
    assert not method.uses_sensitive_at_prediction()


@pytest.mark.parametrize(
    "options", [{"fairness": "eop"}, {"eps": 0.0}, {"max_iter": 0}, {"lam": 1.0}],
)
def test_invalid_options_raise(options: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        make_method("expgrad", **options)


def test_scores_are_probabilities_of_the_right_length(planted, dp_scorer) -> None:
    scores = dp_scorer(planted.test.X, planted.test.a)
    assert scores.shape == (len(planted.test),)
    assert scores.dtype == np.float64
    assert np.all((scores >= 0) & (scores <= 1))
    np.testing.assert_array_equal(scores, dp_scorer(planted.test.X, planted.test.a))  # expected prediction: no sampling


def test_dp_constraint_shrinks_the_gaps(planted, dp_scorer) -> None:
    plain = LogisticRegression(max_iter=1000, random_state=0).fit(planted.train.X, planted.train.y)
    plain_scores = plain.predict_proba(planted.test.X)[:, 1]
    fair_scores = dp_scorer(planted.test.X, planted.test.a)
    plain_gap = dp_gap_hard(plain_scores, planted.test.a)
    assert plain_gap > 0.4
    assert dp_gap_hard(fair_scores, planted.test.a) < plain_gap / 2
    # The reduction bounds the randomized classifier's gap, i.e. the soft gap of its expected prediction.
    assert dp_gap(fair_scores, planted.test.a) < 0.05 < dp_gap(plain_scores, planted.test.a)


def test_train_runs_expgrad_as_one_epoch_without_a_torch_model(planted) -> None:
    seen: list[int] = []
    result = train(make_method("expgrad", fairness="eo", max_iter=5), planted, TrainConfig(epochs=3),
                   on_epoch=lambda epoch, val: seen.append(epoch))
    assert result.model is None and seen == [0] and result.selected_epoch == 0
    assert len(result.epoch_seconds) == 1 and len(result.history) == 1
    assert result.history[0]["val_ap"] == result.val_metrics["ap"]
    assert result.test_scores.shape == (len(planted.test),)
    assert list(result.group_rates.index) == ["g0", "g1"]


def test_torch_methods_keep_the_loop(planted) -> None:
    method = make_method("erm")
    assert method.fit_outside_loop(planted, TrainConfig(seed=0)) is None
    result = train(method, planted, TrainConfig(epochs=1, hidden=(8,)))
    assert isinstance(result.model, nn.Module)


def test_cli_writes_metrics_on_adult(tmp_path: Path) -> None:
    # A few rounds of the reduction keep this test fast; the default (50) takes about a minute on Adult.
    code = main(["train", "--dataset", "adult", "--method", "expgrad", "--max-iter", "3", "--quiet",
                 "--out", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert {"accuracy", "ap", "dp_gap", "eodds_gap"} <= set(record)
    assert record["method"] == "expgrad" and record["options"]["max_iter"] == 3
    assert "--max-iter 3" in record["command"]
