"""What the method base class does for every method: option choices checked once, the batch sampling and
multi-process capability each method declares, the model spec handed to setup, and :func:`prepare`."""

from __future__ import annotations

import pytest
import torch

from groupmixnorm.methods import METHODS, ModelSpec, make_method
from groupmixnorm.methods.adversarial import AdversarialDebiasing
from groupmixnorm.methods.base import method_fields
from groupmixnorm.methods.gapreg import group_mean_gap
from groupmixnorm.training import TrainConfig
from groupmixnorm.training.distributed import Workers, check_method
from groupmixnorm.training.prepare import prepare

CHOICE_OPTIONS = [(name, item.name, item.metadata["choices"]) for name, cls in sorted(METHODS.items())
                  for item in method_fields(cls) if item.metadata.get("choices")]


@pytest.mark.parametrize(("name", "option", "choices"), CHOICE_OPTIONS, ids=lambda v: str(v))
def test_a_value_outside_an_options_choices_is_one_line_naming_option_value_and_choices(name, option, choices) -> None:
    with pytest.raises(ValueError) as raised:
        make_method(name, **{option: "xx"})
    message = str(raised.value)
    assert "\n" not in message and name in message and option in message and "'xx'" in message
    assert all(str(choice) in message for choice in choices)
    for choice in choices:  # every listed value is accepted
        assert getattr(make_method(name, **{option: choice}), option) == choice


def test_choices_are_checked_when_a_method_is_constructed_directly() -> None:
    with pytest.raises(ValueError, match="option fairness must be one of dp, eo, got 'xx'"):
        AdversarialDebiasing(fairness="xx")


def test_range_checks_stay_with_their_methods() -> None:
    with pytest.raises(ValueError, match="align, align_quantiles and align_projections must be >= 0"):
        make_method("gmn", align=-1.0)
    with pytest.raises(ValueError, match="got 1.0, 16 and -2"):
        make_method("gmn", align=1.0, align_projections=-2)
    with pytest.raises(ValueError, match="tol must be in"):
        make_method("thresholdopt", tol=1.0)


@pytest.mark.parametrize(("name", "options", "sampling"), [
    ("erm", {}, "random"), ("adversarial", {}, "random"),
    ("gmn", {}, "random"), ("gmn", {"fairness": "eo"}, "group_label"),
    ("gmn", {"fairness": "eo", "align": 0.0}, "random"),
    ("gapreg", {}, "group"), ("gapreg", {"fairness": "eo"}, "group_label"),
    ("fairmixup", {}, "group"), ("fairmixup", {"fairness": "eo"}, "group_label"),
    ("hsic", {}, "group"), ("prem", {"fairness": "eo"}, "group_label"), ("fairret", {}, "group"),
    ("scorematch", {}, "random"), ("scorematch", {"fairness": "eo"}, "group_label"),
])
def test_each_method_says_how_its_batches_are_drawn(name, options, sampling) -> None:
    assert make_method(name, **options).batch_sampling() == sampling


def test_only_methods_whose_state_is_the_model_train_on_several_processes() -> None:
    supported = {name for name, cls in METHODS.items() if cls.supports_distributed}
    assert supported == {"erm", "gmn", "gapreg", "fairmixup"}
    check_method(make_method("adversarial"), Workers())  # one process: any method
    with pytest.raises(ValueError, match="multi-process training supports erm, gmn, gapreg, fairmixup; adversarial"):
        check_method(make_method("adversarial"), Workers(rank=0, world_size=2))


def test_the_group_gap_ignores_groups_absent_from_the_batch() -> None:
    scores = torch.tensor([0.2, 0.4, 0.9, 0.7])
    assert float(group_mean_gap(scores, torch.tensor([0, 0, 3, 3]))) == pytest.approx(0.5)
    assert float(group_mean_gap(scores, torch.tensor([1, 1, 1, 1]))) == 0.0
    assert float(group_mean_gap(scores[:0], torch.tensor([], dtype=torch.long))) == 0.0


def test_prepare_builds_the_same_start_from_the_same_settings_and_hands_setup_the_spec() -> None:
    spec = ModelSpec(5, 3, (8,))
    config = TrainConfig(hidden=(8,), seed=3, lr=0.01, weight_decay=0.1)
    first, second = (prepare(make_method("adversarial", fairness="eo"), spec, config) for _ in range(2))
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert first.trained is first.model  # one process: no DDP copy
    assert first.optimizer.param_groups[0]["lr"] == 0.01 and first.optimizer.param_groups[0]["weight_decay"] == 0.1
    assert torch.equal(first.generator.get_state(), torch.Generator().manual_seed(3).get_state())
    method = make_method("adversarial", fairness="eo")
    prepare(method, spec, config)
    assert method.adversary[0].in_features == 3 and method.adversary[-1].out_features == spec.num_groups
