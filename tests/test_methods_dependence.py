"""The FFB-style penalties (HSIC, prejudice remover), score matching and the fairret peer: their values by
hand, and that each one, weighted up, shrinks the gap that ERM leaves on planted data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import make_data, small

from groupmixnorm.methods import make_method
from groupmixnorm.methods.dependence import hsic, prejudice_index
from groupmixnorm.training import train


def _numpy_hsic(scores: np.ndarray, groups: np.ndarray) -> float:
    """tr(K H L H) / (n-1)^2 written out with explicit matrices."""
    n = len(scores)
    squared = (scores[:, None] - scores[None, :]) ** 2
    positive = np.sort(squared[squared > 0])
    kernel = np.exp(-squared / (2 * positive[(len(positive) - 1) // 2]))  # torch's median: the lower middle value
    same = (groups[:, None] == groups[None, :]).astype(float)
    centring = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(kernel @ centring @ same @ centring)) / (n - 1) ** 2


def test_hsic_equals_the_matrix_formula() -> None:
    rng = np.random.default_rng(0)
    scores, groups = rng.random(40), rng.integers(0, 3, 40)
    value = hsic(torch.as_tensor(scores), torch.as_tensor(groups))
    assert float(value) == pytest.approx(_numpy_hsic(scores, groups), rel=1e-10)


def test_hsic_is_zero_for_scores_that_do_not_depend_on_the_group_and_positive_when_they_do() -> None:
    groups = torch.tensor([0, 1] * 20)
    same_scores_per_pair = torch.repeat_interleave(torch.linspace(0.1, 0.9, 20, dtype=torch.float64), 2)
    assert float(hsic(same_scores_per_pair, groups)) == pytest.approx(0.0, abs=1e-12)
    assert float(hsic(groups.double() * 0.5 + 0.25, groups)) > 0.1


def test_prejudice_index_is_the_mutual_information_of_label_and_group() -> None:
    # Deterministic scores 0/1 equal to the group: the predicted label is the group, MI = entropy = log 2.
    groups = torch.tensor([0, 1, 0, 1])
    scores = torch.tensor([1e-9, 1 - 1e-9, 1e-9, 1 - 1e-9], dtype=torch.float64)
    assert float(prejudice_index(scores, groups)) == pytest.approx(np.log(2), abs=1e-6)
    # Scores that are the same in both groups carry no information about the group.
    flat = torch.tensor([0.3, 0.3, 0.7, 0.7], dtype=torch.float64)
    assert float(prejudice_index(flat, torch.tensor([0, 1, 1, 0]))) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("name", "options"), [("hsic", {"lam": 20.0}), ("prem", {"lam": 100.0}),
                                               ("scorematch", {"lam": 10.0}), ("fairret", {"lam": 5.0})])
def test_each_penalty_shrinks_the_gap_erm_leaves(name: str, options: dict) -> None:
    data = make_data()
    config = small(epochs=2, batch_size=32, hidden=(16,), select="last")
    erm = train(make_method("erm"), data, config).metrics
    fair = train(make_method(name, **options), data, config).metrics
    assert erm["dp_gap_hard"] > 0.25
    assert fair["dp_gap_hard"] < 0.6 * erm["dp_gap_hard"]


def test_bad_options_are_refused() -> None:
    with pytest.raises(ValueError, match="lam must be >= 0"):
        make_method("hsic", lam=-1.0)
    with pytest.raises(ValueError, match="fairness must be one of"):
        make_method("prem", fairness="xx")
    with pytest.raises(ValueError, match="quantiles >= 1"):
        make_method("scorematch", quantiles=0)
