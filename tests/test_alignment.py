"""The alignment penalty (moments, quantiles, conditional on the label) and the placements that use it."""

from __future__ import annotations

import pytest
import torch

from groupmixnorm.methods import make_method
from groupmixnorm.methods.models import build_mlp
from groupmixnorm.nn import GroupMixNorm1d, collect_alignment, functional as F, use_groups
from groupmixnorm.training import TrainConfig, train

from test_training import make_data


def _reference_quantile_penalty(x: torch.Tensor, groups: torch.Tensor, levels: int, eps: float) -> torch.Tensor:
    """A loop over groups and channels with nearest-rank quantiles: what the vectorized version computes."""
    u = torch.linspace(0, 1, levels, dtype=x.dtype)
    batch_std = torch.sqrt(x.var(dim=0, unbiased=False) + eps)
    total, present = x.new_zeros(()), [g for g in torch.unique(groups) if int((groups == g).sum()) >= 2]
    count = sum(int((groups == g).sum()) for g in present)
    for g in present:
        members = x[groups == g]
        distance = x.new_zeros(())
        for c in range(x.shape[1]):
            own = members[:, c].sort().values
            pooled = x[:, c].sort().values
            own_q = own[(u * (len(own) - 1)).round().long()]
            pooled_q = pooled[(u * (len(pooled) - 1)).round().long()]
            distance = distance + (((own_q - pooled_q) / batch_std[c]) ** 2).mean()
        total = total + len(members) / count * distance / x.shape[1]
    return total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quantile_penalty_matches_a_loop_over_groups(seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(37, 3, generator=generator, dtype=torch.float64)
    groups = torch.randint(0, 4, (37,), generator=generator)
    groups[groups == 2] = 3  # group 2 absent
    groups[0] = 2  # ... then a singleton: it takes no share
    moments = F.group_moments(x, groups, 5)
    vectorized = F.alignment_penalty(x, groups, moments, eps=1e-5, quantiles=9)
    keep = groups != 2
    reference = _reference_quantile_penalty(x[keep], groups[keep], 9, 1e-5)
    # The reference pools only eligible samples; compare on a batch without the singleton too.
    moments_kept = F.group_moments(x[keep], groups[keep], 5)
    assert F.alignment_penalty(x[keep], groups[keep], moments_kept, eps=1e-5, quantiles=9).item() == pytest.approx(
        reference.item(), rel=1e-9)
    assert torch.isfinite(vectorized)


def test_quantile_penalty_sees_shape_differences_that_moments_miss():
    # Group 1 is bimodal with the same mean and deviation as group 0's normal values.
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(4000, 1, generator=generator, dtype=torch.float64)
    signs = torch.randint(0, 2, (4000, 1), generator=generator).to(torch.float64) * 2 - 1
    bimodal = signs + 0.01 * torch.randn(4000, 1, generator=generator, dtype=torch.float64)
    normal = (normal - normal.mean()) / normal.std(unbiased=False)
    bimodal = (bimodal - bimodal.mean()) / bimodal.std(unbiased=False)
    x = torch.cat([normal, bimodal])
    groups = torch.cat([torch.zeros(4000, dtype=torch.long), torch.ones(4000, dtype=torch.long)])
    moments = F.group_moments(x, groups, 2)
    assert F.alignment_penalty(x, groups, moments, eps=1e-5).item() < 1e-12
    assert F.alignment_penalty(x, groups, moments, eps=1e-5, quantiles=16).item() > 0.01


def test_penalties_vanish_for_identical_groups_and_have_gradients():
    x = torch.randn(50, 4, dtype=torch.float64)
    twin = torch.cat([x, x]).requires_grad_()
    groups = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    for quantiles in (0, 8):
        penalty = F.alignment_penalty(twin, groups, F.group_moments(twin, groups, 2), eps=1e-5, quantiles=quantiles)
        assert penalty.item() == pytest.approx(0.0, abs=1e-12)
    shifted = (twin + groups.unsqueeze(1).to(twin.dtype)).detach().requires_grad_()
    penalty = F.alignment_penalty(shifted, groups, F.group_moments(shifted, groups, 2), eps=1e-5, quantiles=8)
    penalty.backward()
    assert penalty.item() > 0.1 and shifted.grad.abs().sum() > 0


def test_conditional_alignment_averages_the_per_label_penalties():
    torch.manual_seed(0)
    x = torch.randn(64, 3, dtype=torch.float64)
    groups = torch.arange(64) % 2
    labels = (torch.arange(64) // 2) % 2
    labels[:6] = 1  # unequal label shares
    layer = GroupMixNorm1d(3, num_groups=2, align_quantiles=4).double()
    with use_groups(groups), collect_alignment(condition=labels) as penalties:
        layer(x)
    expected = 0.0
    for value in (0, 1):
        members = labels == value
        moments = F.group_moments(x[members], groups[members], 2)
        expected += members.double().mean() * F.alignment_penalty(x[members], groups[members], moments, eps=1e-5,
                                                                   quantiles=4)
    assert len(penalties) == 1
    assert penalties[0].item() == pytest.approx(float(expected), rel=1e-9)


def test_logit_and_head_placements_build_the_layers_where_asked():
    model = build_mlp(5, (4, 3), norm="groupmixnorm", placement="1,head,logit", num_groups=2)
    kinds = [type(layer).__name__ for layer in model]
    assert kinds == ["Linear", "ReLU", "Linear", "GroupMixNorm1d", "ReLU", "GroupMixNorm1d", "Linear", "GroupMixNorm1d"]
    assert model[-1].num_features == 1 and model[5].num_features == 3
    with pytest.raises(ValueError, match="placement"):
        build_mlp(5, (4,), norm="groupmixnorm", placement="tail", num_groups=2)


def test_the_default_gmn_closes_most_of_the_gap_that_the_plain_layer_leaves():
    data = make_data(n=1500, seed=3)
    config = TrainConfig(epochs=6, batch_size=64, hidden=(16,), lr=5e-3, seed=0, select="last", sampling="group")
    plain = train(make_method("gmn", placement="all", align=0.0), data, config)
    aligned = train(make_method("gmn"), data, config)
    assert plain.metrics["dp_gap"] > 0.2
    assert aligned.metrics["dp_gap"] < 0.5 * plain.metrics["dp_gap"]
    assert aligned.metrics["accuracy"] > 0.6


def _identical_marginals() -> tuple[torch.Tensor, torch.Tensor]:
    """Two groups whose every channel has the same distribution: group 0's two channels are independent
    normals, group 1's are one normal copied, so they differ only along (1, -1), where group 1 has no spread."""
    generator = torch.Generator().manual_seed(0)
    independent = torch.randn(4000, 2, generator=generator, dtype=torch.float64)
    copied = torch.randn(4000, 1, generator=generator, dtype=torch.float64).expand(4000, 2)
    x = torch.cat([independent, copied]).contiguous()
    groups = torch.cat([torch.zeros(4000, dtype=torch.long), torch.ones(4000, dtype=torch.long)])
    return x, groups


def test_the_sliced_penalty_sees_a_difference_that_no_single_channel_shows():
    x, groups = _identical_marginals()
    moments = F.group_moments(x, groups, 2)
    torch.manual_seed(0)
    per_channel = F.alignment_penalty(x, groups, moments, eps=1e-5, quantiles=16).item()
    sliced = F.alignment_penalty(x, groups, moments, eps=1e-5, quantiles=16, projections=64).item()
    # Along a direction at angle t to (1, 1), group 1's spread is |cos t| times sqrt(2) against group 0's 1:
    # averaged over directions the distance is of order 0.1 or more; per channel it is only the sampling noise
    # of 4000 values (the extreme quantiles' mostly, a few 1e-3).
    assert per_channel < 0.01
    assert sliced > 10 * per_channel and sliced > 0.1


def test_the_sliced_penalty_is_the_quantile_penalty_of_the_standardized_projections():
    x, groups = _identical_marginals()
    x = x[::20].clone().requires_grad_()
    groups = groups[::20]
    moments = F.group_moments(x, groups, 2)
    torch.manual_seed(3)
    sliced = F.sliced_alignment_penalty(x, groups, moments, eps=1e-5, directions=5, levels=8)
    torch.manual_seed(3)
    basis = torch.randn(2, 5, dtype=x.dtype)
    standardized = (x - moments.batch_mean) / torch.sqrt(moments.batch_var + 1e-5)
    projected = standardized @ (basis / basis.norm(dim=0))
    expected = F.quantile_alignment_penalty(projected, groups, F.group_moments(projected, groups, 2), eps=1e-5,
                                            levels=8)
    assert sliced.item() == pytest.approx(expected.item(), rel=1e-9)
    sliced.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_a_layer_reports_the_sliced_penalty_of_its_input_and_refuses_negative_counts():
    x, groups = _identical_marginals()
    layer = GroupMixNorm1d(2, num_groups=2, align_quantiles=8, align_projections=4).double()
    torch.manual_seed(5)
    with use_groups(groups), collect_alignment() as penalties:
        layer(x)
    torch.manual_seed(5)
    torch._standard_gamma(torch.ones(2, dtype=torch.float64))  # the layer's mixing draw comes first
    expected = F.sliced_alignment_penalty(x, groups, F.group_moments(x, groups, 2), eps=1e-5, directions=4, levels=8)
    assert penalties[0].item() == pytest.approx(expected.item(), rel=1e-9)
    with pytest.raises(ValueError, match="align_projections must be a non-negative int, got -1"):
        GroupMixNorm1d(2, num_groups=2, align_projections=-1)
