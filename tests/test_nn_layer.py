"""The GroupMixNorm layer: statistics, gradients, state, routing, degenerate batches and export."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from groupmixnorm.nn import GroupMixNorm1d, GroupMixNorm2d, current_groups, use_groups
from groupmixnorm.nn import _kernels as K
from groupmixnorm.nn import functional as F


def biased_batch(n: int = 96, channels: int = 6, groups: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features whose per-channel mean and scale differ strongly between groups."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.arange(n) % groups
    x = torch.randn(n, channels, generator=gen)
    x = x * (1.0 + a.unsqueeze(1)) + 3.0 * a.unsqueeze(1)
    return x, a


def per_group_moments(y: torch.Tensor, a: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [0] + list(range(2, y.dim()))
    flat = [y[a == g].transpose(0, 1).reshape(y.shape[1], -1) for g in range(num_groups)]
    del dims
    means = torch.stack([f.mean(dim=1) for f in flat])
    stds = torch.stack([f.std(dim=1, unbiased=False) for f in flat])
    return means, stds


@pytest.mark.parametrize("output_scale", ["batch", "mixed"])
@pytest.mark.parametrize("alpha", [0.3, 1.0, 10.0])
def test_shared_mix_gives_every_group_identical_moments(output_scale: str, alpha: float) -> None:
    torch.manual_seed(1)
    x, a = biased_batch()
    layer = GroupMixNorm1d(6, num_groups=3, alpha=alpha, output_scale=output_scale)
    means, stds = per_group_moments(layer(x, a), a, 3)
    input_means, _ = per_group_moments(x, a, 3)
    assert (input_means.max(0).values - input_means.min(0).values).min() > 5.0  # the input really is biased
    torch.testing.assert_close(means, means[:1].expand_as(means), atol=1e-4, rtol=0)
    torch.testing.assert_close(stds, stds[:1].expand_as(stds), atol=1e-4, rtol=0)


def test_shared_mix_for_images_aligns_groups_over_spatial_axes() -> None:
    torch.manual_seed(2)
    a = torch.tensor([0, 1, 1, 0, 2, 2, 1, 0])
    x = torch.randn(8, 4, 5, 5) + 2.0 * a.view(-1, 1, 1, 1)
    y = GroupMixNorm2d(4, num_groups=3)(x, a)
    means, stds = per_group_moments(y, a, 3)
    torch.testing.assert_close(means, means[:1].expand_as(means), atol=1e-4, rtol=0)
    torch.testing.assert_close(stds, stds[:1].expand_as(stds), atol=1e-4, rtol=0)


def test_batch_output_scale_matches_batchnorm_on_a_single_group() -> None:
    x, _ = biased_batch()
    ones = torch.zeros(x.shape[0], dtype=torch.long)
    expected = nn.BatchNorm1d(6)(x)
    torch.testing.assert_close(GroupMixNorm1d(6, num_groups=2)(x, ones), expected, atol=1e-5, rtol=1e-5)


def test_mixed_output_scale_is_identity_on_a_single_group() -> None:
    x, _ = biased_batch()
    ones = torch.zeros(x.shape[0], dtype=torch.long)
    torch.testing.assert_close(GroupMixNorm1d(6, output_scale="mixed")(x, ones), x, atol=1e-4, rtol=1e-4)


def test_untrained_layer_in_eval_equals_untrained_batchnorm() -> None:
    x, _ = biased_batch()
    torch.testing.assert_close(GroupMixNorm1d(6).eval()(x), nn.BatchNorm1d(6).eval()(x))


def test_pairwise_mix_matches_two_groups_in_expectation_not_exactly() -> None:
    # With two groups and E[lambda] = 1/2 both groups average to the midpoint of their statistics.
    torch.manual_seed(3)
    x, a = biased_batch(n=16, groups=2)
    layer = GroupMixNorm1d(6, num_groups=2, mix="pairwise")
    draws = torch.stack([per_group_moments(layer(x, a), a, 2)[0] for _ in range(2000)])
    spread_one_draw = (draws[0].max(0).values - draws[0].min(0).values).max()
    mean_over_draws = draws.mean(0)
    spread_in_expectation = (mean_over_draws.max(0).values - mean_over_draws.min(0).values).max()
    assert spread_one_draw > 0.05
    assert spread_in_expectation < spread_one_draw / 3


def test_pairwise_weights_are_convex_and_pick_another_present_group() -> None:
    torch.manual_seed(4)
    groups = torch.tensor([0, 0, 2, 2, 2, 0])
    counts = torch.tensor([3.0, 0.0, 3.0])
    weights = F.pairwise_mixing_weights(counts, groups, alpha=1.0)
    torch.testing.assert_close(weights.sum(1), torch.ones(6))
    assert (weights[:, 1] == 0).all(), "an absent group took weight"
    assert (weights[groups == 0][:, 2] > 0).all() and (weights[groups == 2][:, 0] > 0).all()


def test_absent_and_singleton_groups_take_no_weight() -> None:
    torch.manual_seed(5)
    counts = torch.tensor([10.0, 0.0, 1.0, 7.0])
    for _ in range(20):
        weights = F.shared_mixing_weights(counts, alpha=0.5)
        assert weights[1] == 0 and weights[2] == 0
        torch.testing.assert_close(weights.sum(), torch.tensor(1.0))


def test_singleton_group_is_normalized_with_batch_statistics() -> None:
    torch.manual_seed(6)
    x = torch.randn(9, 3)
    a = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 2])
    moments = F.group_moments(x, a, 3)
    table_mean, table_std = F.statistics_table(moments, 1e-5)
    torch.testing.assert_close(table_mean[2], x.mean(0))
    torch.testing.assert_close(table_std[2], torch.sqrt(x.var(0, unbiased=False) + 1e-5))
    y = GroupMixNorm1d(3, num_groups=3)(x, a)
    assert torch.isfinite(y).all()


def test_group_moments_match_a_loop_over_groups() -> None:
    x, a = biased_batch(n=50, groups=4)
    moments = F.group_moments(x, a, 5)
    for g in range(4):
        torch.testing.assert_close(moments.mean[g], x[a == g].mean(0))
        torch.testing.assert_close(moments.var[g], x[a == g].var(0, unbiased=False))
    assert moments.counts[4] == 0
    torch.testing.assert_close(moments.batch_mean, x.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moments.batch_var, x.var(0, unbiased=False), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("output_scale", ["batch", "mixed"])
@pytest.mark.parametrize("shape", [(7, 3), (6, 2, 3), (5, 2, 2, 3)])
def test_gradcheck_with_fixed_mixing(output_scale: str, shape: tuple[int, ...]) -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(*shape, dtype=torch.float64, generator=gen, requires_grad=True)
    a = torch.tensor([0, 1, 2, 1, 0, 2, 1][: shape[0]])
    weight = torch.rand(shape[1], dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(shape[1], dtype=torch.float64, generator=gen, requires_grad=True)
    shared = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    per_sample = torch.softmax(torch.randn(shape[0], 3, dtype=torch.float64, generator=gen), dim=1)
    for mixing in (shared, per_sample):
        def fn(x, weight, bias, mixing=mixing):
            return F.group_mix_norm(x, a, mixing, num_groups=3, weight=weight, bias=bias, output_scale=output_scale)

        assert torch.autograd.gradcheck(fn, (x, weight, bias))


def test_state_dict_round_trip_restores_evaluation_exactly() -> None:
    torch.manual_seed(8)
    x, a = biased_batch()
    source = GroupMixNorm1d(6, num_groups=3, eval_mode="group")
    for _ in range(5):
        source(x, a)
    source.weight.data.uniform_()
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    target = GroupMixNorm1d(6, num_groups=3, eval_mode="group")
    target.load_state_dict(torch.load(buffer))
    source.eval(), target.eval()
    torch.testing.assert_close(target(x, a), source(x, a), rtol=0, atol=0)
    assert int(target.num_batches_tracked) == 5
    assert set(target.state_dict()) >= {"running_group_mean", "running_group_var", "running_mix_std"}


def test_permutation_equivariance_with_fixed_mixing() -> None:
    x, a = biased_batch(n=40)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(9))
    mixing = torch.tensor([0.6, 0.1, 0.3])
    out = F.group_mix_norm(x, a, mixing, num_groups=3)
    out_permuted = F.group_mix_norm(x[perm], a[perm], mixing, num_groups=3)
    torch.testing.assert_close(out_permuted, out[perm], atol=1e-5, rtol=1e-5)


def test_running_statistics_track_population_groups_and_mixture() -> None:
    torch.manual_seed(10)
    x, a = biased_batch(n=3000)
    layer = GroupMixNorm1d(6, num_groups=3, momentum=None)
    for _ in range(30):
        layer(x, a)
    torch.testing.assert_close(layer.running_mean, x.mean(0), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(layer.running_var, x.var(0), atol=1e-3, rtol=1e-3)
    for g in range(3):
        torch.testing.assert_close(layer.running_group_mean[g], x[a == g].mean(0), atol=1e-4, rtol=1e-4)
    # Dirichlet(1) over 3 groups averages to equal weights, so the running mixed mean nears the mean of group means.
    group_means = torch.stack([x[a == g].mean(0) for g in range(3)]).mean(0)
    assert (layer.running_mix_mean - group_means).abs().max() < 0.6


def test_eval_without_groups_needs_no_attribute_and_is_deterministic() -> None:
    x, a = biased_batch()
    layer = GroupMixNorm1d(6, num_groups=3)
    layer(x, a)
    layer.eval()
    first, second = layer(x), layer(x)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(layer(x, a), first, rtol=0, atol=0)  # population mode ignores the groups


def test_group_eval_mode_removes_group_offsets_and_needs_groups() -> None:
    torch.manual_seed(11)
    x, a = biased_batch(n=900)
    layer = GroupMixNorm1d(6, num_groups=3, eval_mode="group", momentum=None)
    for _ in range(10):
        layer(x, a)
    layer.eval()
    means, _ = per_group_moments(layer(x, a), a, 3)
    assert (means.max(0).values - means.min(0).values).max() < 1e-3
    with pytest.raises(ValueError, match="needs the group ids in evaluation"):
        layer(x)


def test_posterior_weights_are_bayes_rule_under_the_groups_gaussians() -> None:
    """Against a direct computation: the product over channels and positions of normal densities, equal priors."""
    gen = torch.Generator().manual_seed(3)
    group_mean, group_var = torch.randn(3, 2, generator=gen, dtype=torch.float64), torch.rand(3, 2, generator=gen,
                                                                                             dtype=torch.float64) + 0.5
    for x in (torch.randn(5, 2, generator=gen, dtype=torch.float64),
              torch.randn(5, 2, 3, 2, generator=gen, dtype=torch.float64)):
        values = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)  # (N, C, positions)
        normal = torch.distributions.Normal(group_mean.T.unsqueeze(0).unsqueeze(-1),
                                            (group_var + 1e-5).sqrt().T.unsqueeze(0).unsqueeze(-1))
        log_likelihood = normal.log_prob(values.unsqueeze(2)).sum(dim=(1, 3))  # (N, G)
        expected = torch.softmax(log_likelihood, dim=1)
        got = F.posterior_group_weights(x, group_mean, group_var, eps=1e-5)
        torch.testing.assert_close(got, expected)
        known = torch.tensor([True, False, True])
        hidden = F.posterior_group_weights(x, group_mean, group_var, eps=1e-5, known=known)
        assert (hidden[:, 1] == 0).all()
        torch.testing.assert_close(hidden, expected * known / (expected * known).sum(dim=1, keepdim=True))


def test_posterior_eval_mode_guesses_the_groups_and_removes_most_of_their_offsets_without_the_attribute() -> None:
    x, a = biased_batch(n=900)  # group g is N(3g, (1+g)^2) on each of 6 channels: mostly plain from x
    layers = {mode: GroupMixNorm1d(6, num_groups=3, eval_mode=mode, momentum=None) for mode in ("posterior", "population")}
    for layer in layers.values():
        for _ in range(5):
            layer(x, a)
        layer.eval()
    trained = layers["posterior"]
    weights = F.posterior_group_weights(x, trained.running_group_mean, trained.running_group_var, eps=trained.eps)
    assert (weights.argmax(dim=1) == a).float().mean() > 0.9
    with torch.no_grad():
        spread = {mode: per_group_moments(layer(x), a, 3)[0] for mode, layer in layers.items()}
    offsets = {mode: (means.max(0).values - means.min(0).values).max() for mode, means in spread.items()}
    assert offsets["posterior"] < 0.25 * offsets["population"]
    untrained = GroupMixNorm1d(6, num_groups=3, eval_mode="posterior").eval()
    torch.testing.assert_close(untrained(x), GroupMixNorm1d(6, num_groups=3).eval()(x))  # no group seen yet


def test_probability_p_zero_is_batch_norm() -> None:
    x, a = biased_batch()
    torch.testing.assert_close(GroupMixNorm1d(6, num_groups=3, p=0.0)(x, a), nn.BatchNorm1d(6)(x), atol=1e-5, rtol=1e-5)


def test_use_groups_routes_through_sequential_and_leaves_nothing_behind() -> None:
    torch.manual_seed(12)
    x, a = biased_batch()
    model = nn.Sequential(nn.Linear(6, 8), GroupMixNorm1d(8, num_groups=3), nn.ReLU(), GroupMixNorm1d(8, num_groups=3))
    with pytest.raises(ValueError, match="needs the protected-group ids in training"):
        model(x)
    with use_groups(a):
        assert current_groups() is a
        model(x)
    assert current_groups() is None
    assert int(model[1].group_batches_tracked.sum()) == 3


def test_explicit_groups_win_over_the_context() -> None:
    torch.manual_seed(13)
    x, a = biased_batch()
    layer = GroupMixNorm1d(6, num_groups=3)
    wrong = torch.zeros_like(a)
    torch.manual_seed(0)
    with use_groups(wrong):
        routed = layer(x, a)
    torch.manual_seed(0)
    direct = layer(x, a)
    torch.testing.assert_close(routed, direct)


def test_nested_use_groups_restores_the_outer_value() -> None:
    outer, inner = torch.tensor([0]), torch.tensor([1])
    with use_groups(outer):
        with use_groups(inner):
            assert current_groups() is inner
        with use_groups(None):
            assert current_groups() is None
        assert current_groups() is outer


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (torch.tensor([0, 1, 2, 3]), "out of range for num_groups=3"),
        (torch.tensor([0, -1, 1, 0]), "non-negative"),
        (torch.tensor([0.0, 1.0, 1.0, 0.0]), "integer dtype"),
        (torch.tensor([True, False, True, False]), "integer dtype"),
        (torch.tensor([0, 1, 1]), r"shape \(N,\) = \(4,\)"),
        (torch.tensor([[0, 1, 1, 0]]), r"shape \(N,\)"),
        ([0, 1, 1, 0], "torch.Tensor"),
    ],
)
def test_bad_groups_raise_a_value_error_naming_the_problem(groups, message: str) -> None:
    layer = GroupMixNorm1d(5, num_groups=3)
    with pytest.raises(ValueError, match=message):
        layer(torch.randn(4, 5), groups)


def test_bad_inputs_and_options_raise_value_errors() -> None:
    with pytest.raises(ValueError, match="built for 5 channels"):
        GroupMixNorm1d(5)(torch.randn(4, 6), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="expects 2D or 3D"):
        GroupMixNorm1d(5)(torch.randn(4, 5, 2, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="expects 4D"):
        GroupMixNorm2d(5)(torch.randn(4, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="more than one value per channel"):
        GroupMixNorm1d(5)(torch.randn(1, 5), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="mix must be one of"):
        GroupMixNorm1d(5, mix="global")
    with pytest.raises(ValueError, match="probability"):
        GroupMixNorm1d(5, p=1.5)
    with pytest.raises(ValueError, match="eval_mode='group' needs num_groups"):
        GroupMixNorm1d(5, eval_mode="group")


def test_num_groups_none_accepts_any_ids_in_training() -> None:
    x = torch.randn(20, 4)
    a = torch.tensor([0, 7] * 10)
    y = GroupMixNorm1d(4)(x, a)
    means, _ = per_group_moments(y, (a == 7).long(), 2)
    torch.testing.assert_close(means[0], means[1], atol=1e-4, rtol=0)


def test_no_running_stats_eval_uses_the_batch() -> None:
    x, a = biased_batch()
    layer = GroupMixNorm1d(6, num_groups=3, track_running_stats=False).eval()
    torch.testing.assert_close(layer(x), nn.BatchNorm1d(6, track_running_stats=False).eval()(x), atol=1e-5, rtol=1e-5)
    means, _ = per_group_moments(layer(x, a), a, 3)
    assert (means.max(0).values - means.min(0).values).max() < 1e-4


def test_a_trained_model_exports_and_runs_without_the_attribute() -> None:
    torch.manual_seed(14)
    x, a = biased_batch()
    model = nn.Sequential(nn.Linear(6, 8), GroupMixNorm1d(8, num_groups=3), nn.ReLU(), nn.Linear(8, 1))
    with use_groups(a):
        model(x)
    model.eval()
    batch = torch.export.Dim("batch")
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    other = torch.randn(11, 6)
    torch.testing.assert_close(exported.module()(other), model(other))


@pytest.mark.parametrize("eval_mode", ["population", "posterior"])
def test_a_trained_model_exports_to_onnx_without_the_attribute(tmp_path, eval_mode) -> None:
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(15)
    x, a = biased_batch()
    model = nn.Sequential(nn.Linear(6, 8), GroupMixNorm1d(8, num_groups=3, eval_mode=eval_mode), nn.ReLU(),
                          nn.Linear(8, 1))
    with use_groups(a):
        model(x)
    model.eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        model, (x,), str(path), input_names=["features"], dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True
    )
    session = onnxruntime.InferenceSession(str(path))
    other = torch.randn(13, 6)
    (onnx_out,) = session.run(None, {"features": other.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), model(other).detach(), atol=1e-5, rtol=1e-5)
    assert [i.name for i in session.get_inputs()] == ["features"]


# ------------------------------------------------------------------------------ fused-path equivalence


def _reference_layer(x, groups, mixing, num_groups, weight, bias, eps, output_scale):
    """GroupMixNorm written the plain way (boolean masks, advanced indexing, ordinary autograd).

    Returns the output and the moments ``(mean, var, batch_mean, batch_var)``; absent groups get zeros.
    """
    dims = [0] + list(range(2, x.dim()))
    spatial = (1,) * (x.dim() - 2)
    rows = lambda t: t.reshape(t.shape[0], -1, *spatial)  # noqa: E731  (N, C) -> broadcast over (N, C, *)
    channels = lambda t: t.reshape(1, -1, *spatial)  # noqa: E731
    counts = torch.stack([(groups == g).sum() for g in range(num_groups)]) * x[0, 0].numel()
    zeros = x.new_zeros(x.shape[1])
    mean = torch.stack([x[groups == g].mean(dims) if counts[g] > 0 else zeros for g in range(num_groups)])
    var = torch.stack([x[groups == g].var(dims, unbiased=False) if counts[g] > 0 else zeros for g in range(num_groups)])
    batch_mean, batch_var = x.mean(dims), x.var(dims, unbiased=False)
    usable = (counts >= 2).unsqueeze(1)
    table_mean = torch.where(usable, mean, batch_mean)
    table_std = torch.sqrt(torch.where(usable, var, batch_var) + eps)
    mixed_mean, mixed_std = mixing @ table_mean, mixing @ table_std
    if mixing.dim() == 1:
        mixed_mean, mixed_std = channels(mixed_mean), channels(mixed_std)
    else:
        mixed_mean, mixed_std = rows(mixed_mean), rows(mixed_std)
    y = mixed_std * (x - rows(table_mean[groups])) / rows(table_std[groups]) + mixed_mean
    if output_scale == "batch":
        y = (y - channels(batch_mean)) / channels(torch.sqrt(batch_var + eps))
    if weight is not None:
        y = y * channels(weight) + channels(bias)
    return y, (mean, var, batch_mean, batch_var)


@pytest.mark.parametrize("output_scale", ["batch", "mixed"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("shape", [(9, 3), (8, 2, 3), (7, 2, 2, 3)])
@pytest.mark.parametrize("degenerate", [True, False])
@pytest.mark.parametrize("large_input_paths", [False, True])
def test_fused_gradients_match_a_plain_autograd_reference(
    output_scale, affine, shared, shape, degenerate, large_input_paths, monkeypatch
) -> None:
    """Outputs, moments and the gradients of x, weight, bias and mixing agree with the plain formulation.

    ``degenerate`` batches have an absent group (1) and a singleton group (3), whose table rows fall back
    to the batch statistics; the others have every group present with at least two samples.
    ``large_input_paths`` forces what large batches use (sorted segment sums, passes over blocks of rows,
    here of two rows with a shorter last one) onto this small one.
    """
    if large_input_paths:
        monkeypatch.setattr(K, "_EMBEDDING_BAG_ABOVE", 0)
        monkeypatch.setattr(K, "_BLOCKED_ABOVE", 0)
        monkeypatch.setattr(K, "_BLOCK_ELEMENTS", 2 * shape[1])
    gen = torch.Generator().manual_seed(17)
    n, channels = shape[0], shape[1]
    ids = [0, 2, 0, 2, 0, 3, 2, 0, 2] if degenerate else [0, 1, 2, 3, 3, 2, 1, 0, 1]
    groups, num_groups = torch.tensor(ids[:n]), 4
    x = (torch.randn(*shape, dtype=torch.float64, generator=gen) * 2 + 1).requires_grad_()
    weight = torch.rand(channels, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_() if affine else None
    bias = torch.randn(channels, dtype=torch.float64, generator=gen).requires_grad_() if affine else None
    if shared:
        mixing = torch.tensor([0.3, 0.1, 0.4, 0.2], dtype=torch.float64)
    else:
        mixing = torch.softmax(torch.randn(n, num_groups, dtype=torch.float64, generator=gen), dim=1)
    mixing.requires_grad_()
    leaves = [t for t in (x, weight, bias, mixing) if t is not None]
    upstream = torch.randn(*shape, dtype=torch.float64, generator=gen)
    # Random weights on the moments too: a penalty on them sends gradients through the same backward.
    moment_weights = torch.randn(4, num_groups, channels, dtype=torch.float64, generator=gen)

    def loss(y, moments):
        mean, var, batch_mean, batch_var = moments
        return ((y * upstream).sum() + (mean * moment_weights[0]).sum() + (var * moment_weights[1]).sum()
                + (batch_mean * moment_weights[2, 0]).sum() + (batch_var * moment_weights[3, 0]).sum())

    counts, segments = K.counts_and_segments(groups, num_groups, x[0, 0].numel(), x.dtype)
    if shared:
        y, moments, _ = K.shared_mix_norm(x, segments, counts, mixing, 1e-5, output_scale, weight, bias,
                                          with_moments=True)
    else:
        moments = F.group_moments(x, groups, num_groups, counts=counts, segments=segments)
        y = K.mix_with_moments(x, segments, mixing, moments, eps=1e-5, output_scale=output_scale, weight=weight,
                               bias=bias)
    expected_y, expected_moments = _reference_layer(x, groups, mixing, num_groups, weight, bias, 1e-5, output_scale)
    torch.testing.assert_close(y, expected_y, atol=1e-10, rtol=1e-10)
    for got, expected in zip(moments[1:], expected_moments):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)

    grads = torch.autograd.grad(loss(y, moments[1:]), leaves)
    expected_grads = torch.autograd.grad(loss(expected_y, expected_moments), leaves)
    for got, expected in zip(grads, expected_grads):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)

    # The public reference and the fused entry point, the same through finite differences; the reference
    # also equals the plain formulation of this test, and its gradient is differentiable again.
    def entry(function):
        def call(*inputs):
            named = dict(zip(("x", "weight", "bias", "mixing"), [t for t in (x, weight, bias, mixing)]))
            named.update({k: v for k, v in zip([k for k, t in named.items() if t is not None], inputs)})
            return function(named["x"], groups, named["mixing"], num_groups=num_groups, weight=named["weight"],
                            bias=named["bias"], output_scale=output_scale)
        return call

    assert torch.autograd.gradcheck(entry(F.fused_group_mix_norm), tuple(leaves))
    if not large_input_paths:  # the reference has no such paths: once is enough
        torch.testing.assert_close(entry(F.group_mix_norm)(*leaves), expected_y, atol=1e-10, rtol=1e-10)
        assert torch.autograd.gradcheck(entry(F.group_mix_norm), tuple(leaves))
        assert torch.autograd.gradgradcheck(entry(F.group_mix_norm), tuple(leaves))


@pytest.mark.parametrize("large_input_paths", [False, True])
def test_fused_path_handles_strided_inputs_and_broadcast_gradients(large_input_paths, monkeypatch) -> None:
    """A transposed (non-contiguous) input and the expanded gradient of ``.sum()`` give the reference result."""
    if large_input_paths:
        monkeypatch.setattr(K, "_EMBEDDING_BAG_ABOVE", 0)
        monkeypatch.setattr(K, "_BLOCKED_ABOVE", 0)
        monkeypatch.setattr(K, "_BLOCK_ELEMENTS", 8)
    gen = torch.Generator().manual_seed(23)
    base = torch.randn(5, 11, dtype=torch.float64, generator=gen).requires_grad_()
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1])
    mixing = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    weight = torch.rand(5, dtype=torch.float64, generator=gen).add_(0.5).requires_grad_()
    bias = torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_()
    x = base.t()  # (11, 5), not contiguous
    y = F.fused_group_mix_norm(x, groups, mixing, num_groups=3, weight=weight, bias=bias)
    expected, _ = _reference_layer(x, groups, mixing, 3, weight, bias, 1e-5, "batch")
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    weights = torch.linspace(-1, 1, 55, dtype=torch.float64).reshape(11, 5)
    for loss, expected_loss in (((y * weights).sum(), (expected * weights).sum()), ((y**2).sum(), (expected**2).sum())):
        grads = torch.autograd.grad(loss, (base, weight, bias), retain_graph=True)
        expected_grads = torch.autograd.grad(expected_loss, (base, weight, bias), retain_graph=True)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    # The expanded upstream gradient of a plain sum.
    (grad,) = torch.autograd.grad(F.fused_group_mix_norm(x, groups, mixing, num_groups=3).sum(), base)
    (want,) = torch.autograd.grad(_reference_layer(x, groups, mixing, 3, None, None, 1e-5, "batch")[0].sum(), base)
    torch.testing.assert_close(grad, want, atol=1e-8, rtol=1e-8)


def test_module_training_step_matches_the_reference_layer_with_the_same_draw() -> None:
    """The module's fused training path (drawing its mixture from the global generator) equals the plain
    formulation with that same draw, output and gradients, and the running statistics see the batch."""
    x, a = biased_batch(n=40, channels=5, groups=4)
    x = x.double().requires_grad_()
    layer = GroupMixNorm1d(5, num_groups=4, dtype=torch.float64)
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.normal_()
    torch.manual_seed(31)
    y = layer(x, a)
    torch.manual_seed(31)
    counts = F.group_counts(a, 4, dtype=torch.float64)
    mixing = F.shared_mixing_weights(counts, layer.alpha)
    expected, (mean, var, batch_mean, batch_var) = _reference_layer(
        x, a, mixing, 4, layer.weight, layer.bias, layer.eps, "batch"
    )
    torch.testing.assert_close(y, expected, atol=1e-10, rtol=1e-10)
    upstream = torch.randn_like(y)
    grads = torch.autograd.grad((y * upstream).sum(), (x, layer.weight, layer.bias))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (x, layer.weight, layer.bias))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(layer.running_mean, 0.1 * batch_mean.detach())
    torch.testing.assert_close(layer.running_group_mean, 0.1 * mean.detach())
    table_std = torch.sqrt(var.detach() + layer.eps)
    torch.testing.assert_close(layer.running_mix_std, 0.9 * (1 + layer.eps) ** 0.5 + 0.1 * (mixing @ table_std))


def test_use_groups_blocks_nest_and_stay_in_their_thread() -> None:
    """An inner block hides the outer value and restores it on exit (also when the block raises); another
    thread sees none of this thread's blocks, and its own block leaves this thread's value alone."""
    import threading

    outer, inner = torch.tensor([0, 1]), torch.tensor([1, 0])
    seen: dict[str, object] = {}
    with use_groups(outer):
        with pytest.raises(RuntimeError), use_groups(inner):
            assert current_groups() is inner
            raise RuntimeError("leave the block")
        assert current_groups() is outer

        def other() -> None:
            seen["before"] = current_groups()
            with use_groups(inner):
                seen["inside"] = current_groups()

        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        assert current_groups() is outer
    assert seen == {"before": None, "inside": inner}
    assert current_groups() is None


@pytest.mark.parametrize("mix", ["shared", "pairwise"])
def test_evaluation_gives_a_batch_the_overall_mean_and_deviation_that_training_gave_it(mix):
    # Groups far apart: with pairwise mixing the samples leave with different means, and that spread is part
    # of the batch's deviation (an average of the per-sample mixtures' deviations leaves it out).
    generator = torch.Generator().manual_seed(0)
    groups = torch.arange(2000) % 2
    x = torch.randn(2000, 3, generator=generator, dtype=torch.float64) * (1 + 2 * groups[:, None])
    x = x + 4 * groups[:, None]
    layer = GroupMixNorm1d(3, num_groups=2, mix=mix, affine=False, output_scale="mixed", momentum=1.0,
                           eps=1e-12).double()
    torch.manual_seed(1)
    trained = layer(x, groups)
    layer.eval()
    evaluated = layer(x)
    torch.testing.assert_close(evaluated.mean(0), trained.mean(0))
    narrowing = (1999 / 2000) ** 0.5  # the running variance is unbiased, as BatchNorm's is
    torch.testing.assert_close(evaluated.std(0, unbiased=False), narrowing * trained.std(0, unbiased=False))


def test_instance_evaluation_removes_a_shift_of_each_images_channels_without_the_attribute():
    generator = torch.Generator().manual_seed(0)
    groups = torch.arange(64) % 2
    images = torch.randn(64, 2, 5, 5, generator=generator, dtype=torch.float64)
    tinted = images + 3.0 * groups.view(-1, 1, 1, 1)  # group 1: every channel of every image shifted
    layer = GroupMixNorm2d(2, num_groups=2, eval_mode="instance").double()
    layer(tinted, groups)
    layer.eval()
    # Each image is standardized on its own, so the shift is gone and the output is the untinted image's.
    torch.testing.assert_close(layer(tinted), layer(images))
    with pytest.raises(ValueError, match="needs more than one position per channel"):
        GroupMixNorm1d(2, num_groups=2, eval_mode="instance").eval()(torch.randn(4, 2))
    with pytest.raises(ValueError, match="needs track_running_stats=True"):
        GroupMixNorm2d(2, eval_mode="instance", track_running_stats=False)
