"""Tests for the training loop: batch sampling, determinism, divergence, epoch selection, every method on
synthetic data, and atomic JSON records."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

import numpy as np
import pytest
import torch

from groupmixnorm.data import Split, TabularDataset
from groupmixnorm.methods import ERM, METHODS, make_method
from groupmixnorm.training import TrainConfig, TrainingDiverged, train
from groupmixnorm.files import write_json_atomic
from groupmixnorm.training.sampling import batch_indices

#: Registered methods that are not torch models trained by the loop (they have their own fit).
NOT_TRAINED_BY_LOOP = {name for name, cls in METHODS.items() if cls.fitted_outside_loop}


def make_data(n: int = 600, d: int = 6, seed: int = 0, shift: float = 2.0) -> TabularDataset:
    """Two groups; feature 0 is shifted by ``shift`` for group 1 and drives the label, so an
    unconstrained model predicts very different positive rates for the two groups."""
    rng = np.random.default_rng(seed)

    def split(m: int) -> Split:
        a = rng.integers(0, 2, m)
        X = rng.normal(size=(m, d)).astype(np.float32)
        X[:, 0] += shift * a
        logit = 1.5 * X[:, 0] + X[:, 1] - 0.75 * shift
        y = (rng.random(m) < 1 / (1 + np.exp(-logit))).astype(np.int64)
        return Split(X, y, a.astype(np.int64))

    return TabularDataset(
        name="synthetic", train=split(n), val=split(n // 3), test=split(n // 3),
        feature_names=[f"x{i}" for i in range(d)], sensitive="group", group_names=["g0", "g1"],
        protocol="synthetic", preprocessor=None,
    )


@pytest.fixture(scope="module")
def data() -> TabularDataset:
    return make_data()


def small(**overrides) -> TrainConfig:
    settings = dict(epochs=2, batch_size=32, hidden=(8,), lr=1e-2, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


# --- batch_indices ---------------------------------------------------------------------------------


def _labels_and_groups(n: int = 103, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, 3, (n,), generator=g)
    y = torch.randint(0, 2, (n,), generator=g).float()
    return y, a


def _batches(sampling, y, a, batch_size, iterations=None, seed=0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return list(batch_indices(sampling, y, a, batch_size=batch_size, iterations=iterations, generator=generator))


def test_random_sampling_covers_every_index_exactly_once_per_epoch() -> None:
    y, a = _labels_and_groups(n=103)
    batches = _batches("random", y, a, batch_size=10)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert torch.equal(torch.sort(torch.cat(batches)).values, torch.arange(103))
    assert not torch.equal(torch.cat(batches), torch.arange(103))  # shuffled


def test_random_sampling_with_iterations_draws_that_many_full_batches() -> None:
    y, a = _labels_and_groups(n=50)
    batches = _batches("random", y, a, batch_size=16, iterations=7)
    assert len(batches) == 7
    assert all(len(b) == 16 for b in batches)
    assert all(int(b.min()) >= 0 and int(b.max()) < 50 for b in batches)


def test_group_sampling_puts_batch_size_of_every_group_in_each_batch() -> None:
    y, a = _labels_and_groups(n=300)
    batches = _batches("group", y, a, batch_size=8)
    assert len(batches) == 300 // (8 * 3)
    for batch in batches:
        assert torch.bincount(a[batch], minlength=3).tolist() == [8, 8, 8]
        assert len(torch.unique(batch)) == len(batch)  # cells are large enough: no repeats


def test_group_label_sampling_puts_batch_size_of_every_cell_in_each_batch() -> None:
    y, a = _labels_and_groups(n=300)
    batches = _batches("group_label", y, a, batch_size=5, iterations=4)
    assert len(batches) == 4
    for batch in batches:
        cells = a[batch] * 2 + y[batch].long()
        assert torch.bincount(cells, minlength=6).tolist() == [5] * 6


def test_a_cell_smaller_than_batch_size_is_drawn_with_replacement() -> None:
    a = torch.tensor([0] * 3 + [1] * 40)
    y = torch.zeros(43)
    (batch,) = _batches("group", y, a, batch_size=8, iterations=1)
    small_group = batch[a[batch] == 0]
    assert len(small_group) == 8
    assert set(small_group.tolist()) <= {0, 1, 2}
    big_group = batch[a[batch] == 1]
    assert len(torch.unique(big_group)) == 8  # the large cell is still drawn without replacement


@pytest.mark.parametrize("sampling", ["random", "group", "group_label"])
def test_same_generator_seed_gives_same_batches(sampling) -> None:
    y, a = _labels_and_groups(n=200)
    first = _batches(sampling, y, a, batch_size=6, seed=5)
    again = _batches(sampling, y, a, batch_size=6, seed=5)
    other = _batches(sampling, y, a, batch_size=6, seed=6)
    assert len(first) == len(again) > 0
    assert all(torch.equal(p, q) for p, q in zip(first, again))
    assert not all(torch.equal(p, q) for p, q in zip(first, other))


# --- determinism and divergence --------------------------------------------------------------------


def test_same_seed_gives_identical_results_and_different_seeds_differ(data) -> None:
    first = train(make_method("gmn"), data, small(seed=3))
    again = train(make_method("gmn"), data, small(seed=3))
    other = train(make_method("gmn"), data, small(seed=4))
    assert first.metrics == again.metrics
    assert first.history == again.history
    np.testing.assert_array_equal(first.test_scores, again.test_scores)
    assert first.metrics != other.metrics
    assert not np.array_equal(first.test_scores, other.test_scores)


@dataclass
class _NaNAfter(ERM):
    """ERM whose loss becomes NaN on the ``at``-th call (counting from 0)."""

    at: int = 0

    def __post_init__(self) -> None:
        self.calls = 0

    def training_loss(self, model, batch):
        loss, logs = super().training_loss(model, batch)
        self.calls += 1
        if self.calls - 1 == self.at:
            loss = loss * float("nan")
        return loss, logs


def test_nan_loss_raises_training_diverged_naming_epoch_and_batch(data) -> None:
    # random sampling with 3 iterations per epoch: call 5 is the third batch of the second epoch
    method = _NaNAfter(at=5)
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 2, batch 3") as caught:
        train(method, data, small(epochs=3, iterations=3))
    assert "nan" in str(caught.value).lower()
    assert method.calls == 6  # stopped at once


# --- epoch selection -------------------------------------------------------------------------------


def _check_selected_weights(result) -> None:
    """The returned model is the selected epoch's: its validation metrics are that epoch's."""
    row = result.history[result.selected_epoch]
    for key in ("ap", "accuracy", "dp_gap"):
        assert result.val_metrics[key] == pytest.approx(row[f"val_{key}"], abs=1e-12)


def test_select_last_keeps_the_last_epoch(data) -> None:
    result = train(make_method("erm"), data, small(epochs=4, iterations=2, select="last"))
    assert result.selected_epoch == 3
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3]
    assert len(result.epoch_seconds) == 4
    _check_selected_weights(result)


def test_select_dp_gap_keeps_the_epoch_with_smallest_validation_gap(data) -> None:
    # lr 1e-2: the gap grows as ERM learns (minimum first); lr 0.1: it wanders (minimum inside the run)
    selected = []
    for lr, seed in ((1e-2, 0), (0.1, 1)):
        result = train(make_method("erm"), data, small(epochs=6, iterations=2, lr=lr, seed=seed, select="dp_gap"))
        gaps = [row["val_dp_gap"] for row in result.history]
        assert len(set(gaps)) == len(gaps)
        assert result.selected_epoch == int(np.argmin(gaps))
        _check_selected_weights(result)
        selected.append(result.selected_epoch)
    assert any(epoch > 0 for epoch in selected)  # not simply the first epoch


def test_select_ap_with_gap_target_keeps_best_ap_among_epochs_meeting_the_target(data) -> None:
    config = small(epochs=6, iterations=2, select="last")
    history = train(make_method("erm"), data, config).history
    gaps = [row["val_dp_gap"] for row in history]
    aps = [row["val_ap"] for row in history]
    target = float(np.median(gaps))
    meeting = [i for i, gap in enumerate(gaps) if gap <= target]
    assert 0 < len(meeting) < len(history)

    constrained = train(make_method("erm"), data, replace(config, select="ap", gap_target=target))
    assert constrained.history == history  # same seed, same run
    expected = max(meeting, key=lambda i: (aps[i], -i))
    assert constrained.selected_epoch == expected
    assert constrained.history[expected]["val_dp_gap"] <= target
    _check_selected_weights(constrained)

    unconstrained = train(make_method("erm"), data, replace(config, select="ap"))
    assert unconstrained.selected_epoch == max(range(len(aps)), key=lambda i: (aps[i], -i))


def test_select_ap_with_unreachable_gap_target_keeps_smallest_gap(data) -> None:
    config = small(epochs=4, iterations=2, select="ap", gap_target=-1.0)
    result = train(make_method("erm"), data, config)
    gaps = [row["val_dp_gap"] for row in result.history]
    assert result.selected_epoch == int(np.argmin(gaps))


# Scripted validation metrics per epoch: (dp_gap, eodds_gap, ap). With a gap target of 0.1, epochs 0-1 miss
# it (epoch 1 has the best AP overall), epochs 2-4 meet it; epoch 3 has the best AP among those, epoch 4 the
# smallest dp gap, epoch 2 the smallest eodds gap.
SCRIPT = [(0.30, 0.40, 0.90), (0.20, 0.30, 0.95), (0.08, 0.01, 0.70), (0.05, 0.20, 0.80), (0.02, 0.10, 0.75)]


@pytest.mark.parametrize(
    ("select", "gap_target", "expected"),
    [("ap", None, 1), ("ap", 0.1, 3), ("ap", 0.01, 4), ("ap", 0.25, 1), ("last", None, 4), ("dp_gap", None, 4),
     ("eodds_gap", None, 2)],
)
def test_selection_rules_on_scripted_validation_metrics(data, monkeypatch, select, gap_target, expected) -> None:
    import groupmixnorm.training.loop as loop

    calls = []

    def scripted(method, model, split):
        index = min(len(calls), len(SCRIPT) - 1)
        calls.append(index)
        dp, eodds, ap = SCRIPT[index]
        metrics = {"accuracy": 0.5, "ap": ap, "dp_gap": dp, "eopp_gap": dp, "eodds_gap": eodds,
                   "dp_gap_hard": dp, "eopp_gap_hard": dp, "eodds_gap_hard": eodds}
        return metrics, np.full(len(split.y), 0.5)

    monkeypatch.setattr(loop, "evaluate", scripted)
    config = small(epochs=len(SCRIPT), iterations=1, select=select, gap_target=gap_target)
    result = train(make_method("erm"), data, config)
    assert [row["val_ap"] for row in result.history] == [ap for _, _, ap in SCRIPT]
    assert result.selected_epoch == expected


@pytest.mark.parametrize(
    ("overrides", "field_name"),
    [({"epochs": 0}, "epochs"), ({"select": "best"}, "select"), ({"sampling": "balanced"}, "sampling"),
     ({"batch_size": 1}, "batch_size"), ({"gap_metric": "accuracy"}, "gap_metric")],
)
def test_train_config_rejects_bad_values_naming_the_field(overrides, field_name) -> None:
    with pytest.raises(ValueError, match=field_name):
        TrainConfig(**overrides)


# --- every method ----------------------------------------------------------------------------------

METHOD_CASES = [
    ("erm", {}),
    ("erm", {"norm": "batchnorm"}),
    ("gmn", {"mix": "shared"}),
    ("gmn", {"mix": "pairwise"}),
    ("gmn", {"eval_mode": "group"}),
    ("gapreg", {"fairness": "dp"}),
    ("gapreg", {"fairness": "eo"}),
    ("adversarial", {"fairness": "dp"}),
    ("adversarial", {"fairness": "eo"}),
    ("fairmixup", {"fairness": "dp"}),
    ("fairmixup", {"fairness": "eo"}),
    ("hsic", {"fairness": "dp"}),
    ("hsic", {"fairness": "eo"}),
    ("prem", {"fairness": "dp"}),
    ("prem", {"fairness": "eo"}),
    ("scorematch", {"fairness": "dp"}),
    ("scorematch", {"fairness": "eo"}),
    ("fairret", {"fairness": "dp"}),
    ("fairret", {"fairness": "eo"}),
]


def test_every_registered_method_is_covered() -> None:
    assert set(METHODS) - NOT_TRAINED_BY_LOOP <= {name for name, _ in METHOD_CASES}


@pytest.mark.parametrize(("name", "options"), METHOD_CASES, ids=lambda v: v if isinstance(v, str) else
                         ",".join(f"{k}={x}" for k, x in v.items()))
def test_method_trains_one_epoch_with_valid_metrics(data, name, options) -> None:
    result = train(make_method(name, **options), data, small(epochs=1, batch_size=16, hidden=(8, 8)))
    metrics = result.metrics
    assert all(math.isfinite(value) for value in metrics.values())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert 0.0 <= metrics["ap"] <= 1.0
    for key in ("dp_gap", "eopp_gap", "eodds_gap", "dp_gap_hard", "eopp_gap_hard", "eodds_gap_hard"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert result.test_scores.shape == (len(data.test),)
    assert np.all((result.test_scores >= 0) & (result.test_scores <= 1))
    assert list(result.group_rates.index) == ["g0", "g1"]
    assert any(key.startswith("train_") for key in result.history[0])


def test_gap_regularization_shrinks_the_demographic_parity_gap(data) -> None:
    config = small(epochs=2, batch_size=32, hidden=(16,), select="last")
    erm = train(make_method("erm"), data, config).metrics
    gapreg = train(make_method("gapreg", lam=10.0, fairness="dp"), data, config).metrics
    assert erm["dp_gap"] > 0.25  # the planted group effect is learnt without a constraint
    assert gapreg["dp_gap"] < 0.5 * erm["dp_gap"]


def test_gmn_uses_the_sensitive_attribute_at_prediction_only_in_group_mode(data) -> None:
    assert make_method("gmn").uses_sensitive_at_prediction() is False
    assert make_method("gmn", eval_mode="group").uses_sensitive_at_prediction() is True
    assert make_method("erm").uses_sensitive_at_prediction() is False

    x = torch.as_tensor(data.test.X)
    a = torch.as_tensor(data.test.a)
    for eval_mode, depends_on_a in (("population", False), ("group", True)):
        method = make_method("gmn", eval_mode=eval_mode)
        model = train(method, data, small(epochs=1)).model.eval()
        with torch.no_grad():
            logits = method.predict_logits(model, x, a)
            flipped = method.predict_logits(model, x, 1 - a)
        assert (not torch.allclose(logits, flipped)) is depends_on_a, eval_mode


# --- records ---------------------------------------------------------------------------------------


def test_write_json_atomic_round_trips_and_leaves_no_temporary_file(tmp_path) -> None:
    payload = {"a": 1, "b": [1.5, "x", None], "nested": {"ok": True},
               "numpy": np.float32(0.25), "array": np.arange(3), "path": tmp_path / "p"}
    target = tmp_path / "sub" / "record.json"
    assert write_json_atomic(target, payload) == target
    loaded = json.loads(target.read_text())
    assert loaded == {"a": 1, "b": [1.5, "x", None], "nested": {"ok": True}, "numpy": 0.25,
                      "array": [0, 1, 2], "path": str(tmp_path / "p")}
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]

    write_json_atomic(target, {"second": 2})  # overwrite
    assert json.loads(target.read_text()) == {"second": 2}
    assert sorted(p.name for p in target.parent.iterdir()) == ["record.json"]


def test_write_json_atomic_failure_keeps_the_previous_file(tmp_path) -> None:
    target = tmp_path / "record.json"
    write_json_atomic(target, {"kept": 1})
    before = target.read_bytes()
    with pytest.raises(TypeError):
        write_json_atomic(target, {"bad": object()})
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


@pytest.mark.parametrize(("norm", "options", "without_bias"), [
    ("batchnorm", {}, True),
    ("groupmixnorm", {}, True),
    ("groupmixnorm", {"output_scale": "mixed"}, False),  # keeps the input's units: a shift passes through
    ("none", {}, False),
])
def test_a_layer_just_before_a_shift_removing_normalization_has_no_bias(norm, options, without_bias) -> None:
    """Such a bias has a gradient that is zero in exact arithmetic, which Adam turns into random lr-sized steps."""
    from groupmixnorm.methods.models import build_cnn, build_mlp

    mlp = build_mlp(5, (4, 3), norm=norm, placement="0,logit", num_groups=2, norm_options=options)
    linears = [layer for layer in mlp if isinstance(layer, torch.nn.Linear)]
    assert [layer.bias is None for layer in linears] == [without_bias, False, without_bias]
    cnn = build_cnn((1, 4, 4), (2, 2), norm=norm, placement="1", num_groups=2, norm_options=options)
    convolutions = [layer for layer in cnn if isinstance(layer, torch.nn.Conv2d)]
    assert [layer.bias is None for layer in convolutions] == [False, without_bias]
