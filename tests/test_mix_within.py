"""Mixing within strata (``mix_within``): each label's groups are mixed among themselves only."""

from __future__ import annotations

import pytest
import torch

from groupmixnorm.methods import make_method
from groupmixnorm.nn import GroupMixNorm1d, GroupMixNorm2d, SyncGroupMixNorm, mix_within, use_groups, use_reference


def _batch(n: int = 240, channels: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features shifted by the group and, more, by the label; every (label, group) cell holds samples."""
    generator = torch.Generator().manual_seed(seed)
    groups = torch.arange(n) % 2
    labels = (torch.arange(n) // 2) % 2
    labels[:10] = 1  # unequal cells
    x = torch.randn(n, channels, generator=generator, dtype=torch.float64) * (1 + groups.unsqueeze(1))
    return x + 2.0 * groups.unsqueeze(1) + 5.0 * labels.unsqueeze(1), groups, labels


def _layer(**options) -> GroupMixNorm1d:
    return GroupMixNorm1d(3, num_groups=2, affine=False, **options).double()


def test_within_each_label_every_group_leaves_alike_and_the_labels_stay_apart():
    x, groups, labels = _batch()
    with use_groups(groups), mix_within(labels):
        out = _layer(output_scale="mixed", eps=1e-12)(x)  # eps shrinks each deviation by sqrt(var / (var + eps))
    for label in (0, 1):
        cells = [out[(labels == label) & (groups == group)] for group in (0, 1)]
        torch.testing.assert_close(cells[0].mean(0), cells[1].mean(0))
        torch.testing.assert_close(cells[0].std(0, unbiased=False), cells[1].std(0, unbiased=False))
    # The labels differ by 5 at the input; a mixture of their groups' means keeps at least that apart.
    assert (out[labels == 1].mean(0) - out[labels == 0].mean(0)).min() > 4.0


@pytest.mark.parametrize("output_scale", ["mixed", "batch"])
def test_each_label_is_the_layer_on_that_label_alone_in_the_batch_s_units(output_scale):
    x, groups, labels = _batch(seed=1)
    torch.manual_seed(7)
    with use_groups(groups), mix_within(labels):
        together = _layer(output_scale=output_scale)(x)
    torch.manual_seed(7)  # one Dirichlet draw per label, label 0's first
    alone = torch.empty_like(x)
    for label in (0, 1):
        rows = labels == label
        alone[rows] = _layer(output_scale="mixed")(x[rows], groups[rows])
    if output_scale == "batch":  # the whole batch's units, which keep the labels' difference
        alone = (alone - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(together, alone)


def test_running_statistics_are_the_groups_over_the_whole_batch():
    x, groups, labels = _batch(seed=2)
    stratified, plain = _layer(), _layer()
    with use_groups(groups):
        with mix_within(labels):
            stratified(x)
        plain(x)
    for name in ("running_mean", "running_var", "running_group_mean", "running_group_var", "group_batches_tracked"):
        torch.testing.assert_close(getattr(stratified, name), getattr(plain, name), msg=name)
    stratified.eval()
    plain.eval()
    # Evaluation ignores the strata: only the mixed running values differ, so the two maps differ by an affine.
    with mix_within(labels):
        assert torch.isfinite(stratified(x)).all()


def test_evaluation_gives_the_batch_the_overall_mean_and_deviation_that_training_gave_it():
    x, groups, labels = _batch(seed=6)
    layer = _layer(output_scale="mixed", momentum=1.0, eps=1e-12)  # the running values are this batch's
    with use_groups(groups), mix_within(labels):
        trained = layer(x)
    layer.eval()
    evaluated = layer(x)  # population statistics: no labels, no groups
    torch.testing.assert_close(evaluated.mean(0), trained.mean(0))
    # The labels' difference is part of the spread: a mixed deviation averaged over the labels would miss it.
    # (The running variance is unbiased, as BatchNorm's is, which narrows evaluation by sqrt((n - 1) / n).)
    narrowing = ((len(x) - 1) / len(x)) ** 0.5
    torch.testing.assert_close(evaluated.std(0, unbiased=False), narrowing * trained.std(0, unbiased=False))
    within = torch.stack([trained[labels == label].std(0, unbiased=False) for label in (0, 1)]).mean(0)
    assert (trained.std(0, unbiased=False) > 1.5 * within).all()


def test_the_reference_path_gives_the_same_values_and_gradients():
    x, groups, labels = _batch(seed=3)
    outputs, gradients = [], []
    for reference in (False, True):
        leaf = x.clone().requires_grad_()
        layer = GroupMixNorm1d(3, num_groups=2).double()
        torch.manual_seed(11)
        with use_groups(groups), mix_within(labels), (use_reference() if reference else torch.enable_grad()):
            out = layer(leaf)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outputs.append(out.detach())
        gradients.append((leaf.grad, layer.weight.grad))
    torch.testing.assert_close(outputs[0], outputs[1])
    for fast, plain in zip(gradients[0], gradients[1]):
        torch.testing.assert_close(fast, plain)


def test_images_mix_within_labels_too():
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(16, 2, 3, 3, generator=generator, dtype=torch.float64)
    groups, labels = torch.arange(16) % 2, torch.arange(16) // 8
    with use_groups(groups), mix_within(labels):
        out = GroupMixNorm2d(2, num_groups=2, affine=False, output_scale="mixed").double()(x)
    for label in (0, 1):
        cells = [out[(labels == label) & (groups == group)].transpose(0, 1).flatten(1) for group in (0, 1)]
        torch.testing.assert_close(cells[0].mean(1), cells[1].mean(1))


def test_bad_strata_are_refused_with_what_is_wrong():
    x, groups, labels = _batch()
    layer = _layer()
    with use_groups(groups):
        with mix_within(labels[:-1]), pytest.raises(ValueError, match=r"mix_within strata must have shape \(N,\)"):
            layer(x)
        with mix_within(labels.double()), pytest.raises(ValueError, match="mix_within strata must have an integer"):
            layer(x)
        with mix_within(labels - 1), pytest.raises(ValueError, match="must be non-negative integers, got -1"):
            layer(x)
        with mix_within(labels), pytest.raises(ValueError, match="only with mix='shared'"):
            _layer(mix="pairwise")(x)


def test_a_sync_layer_in_one_process_mixes_within_labels_like_the_plain_layer():
    x, groups, labels = _batch(seed=5)
    results = []
    for layer in (_layer(), SyncGroupMixNorm(3, num_groups=2, affine=False).double()):
        torch.manual_seed(2)
        with use_groups(groups), mix_within(labels):
            results.append(layer(x))
    torch.testing.assert_close(results[0], results[1])


def test_the_method_mixes_within_labels_on_batches_per_group_and_label():
    method = make_method("gmn", placement="all", align=0.0, mix_within="label")
    assert method.batch_sampling() == "group_label"
    assert make_method("gmn", placement="all", align=0.0).batch_sampling() == "random"
    with pytest.raises(ValueError, match="mix_within must be one of"):
        make_method("gmn", mix_within="group")
