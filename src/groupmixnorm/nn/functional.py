"""Functional core of GroupMixNorm: group moments, mixing weights and the normalization itself.

Everything here is stateless and differentiable. The modules in :mod:`groupmixnorm.nn.modules` own the
running statistics and the random draws; the functions below do the arithmetic, so they can be tested
(``gradcheck``) and reused (a synchronized variant only has to replace :func:`group_moments`).

Shapes: ``x`` is ``(N, C, *)`` (channels second, any number of trailing spatial axes, as in
``torch.nn.BatchNorm*``), ``groups`` is ``(N,)`` with integer ids in ``[0, G)``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.distributions import Beta, Gamma

OutputScale = Literal["batch", "mixed"]

#: A group needs at least this many values per channel for its own variance to mean anything.
MIN_VALUES_PER_GROUP = 2


class GroupMoments(NamedTuple):
    """Per-group statistics of one batch, channels last.

    ``counts`` is the number of values per channel in each group (samples x spatial size), ``(G,)``;
    ``mean`` and ``var`` are ``(G, C)`` (biased variance). ``batch_mean`` and ``batch_var`` are the
    statistics of the whole batch, ``(C,)``, derived from the group ones.
    """

    counts: Tensor
    mean: Tensor
    var: Tensor
    batch_mean: Tensor
    batch_var: Tensor


def _per_sample_channel_sums(x: Tensor) -> Tensor:
    """Sum over the spatial axes: ``(N, C, *) -> (N, C)``."""
    return x.flatten(2).sum(dim=2) if x.dim() > 2 else x


def _broadcast_rows(stat: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample ``(N, C)`` statistics so they broadcast against ``(N, C, *)``."""
    return stat.reshape(stat.shape + (1,) * (x.dim() - 2))


def group_moments(x: Tensor, groups: Tensor, num_groups: int) -> GroupMoments:
    """Per-group, per-channel mean and biased variance from segment reductions.

    Two passes (mean, then the centred second moment) keep the variance accurate when the mean is large
    relative to the spread. Each pass is one ``index_add`` over the batch, so the cost does not grow with
    the number of groups. Groups absent from the batch get count 0 and statistics 0.
    """
    num_channels = x.shape[1]
    spatial = x[0, 0].numel()
    counts = torch.zeros(num_groups, dtype=x.dtype, device=x.device)
    counts = counts.index_add(0, groups, torch.full_like(groups, spatial, dtype=x.dtype))
    safe_counts = counts.clamp_min(1).unsqueeze(1)

    sums = x.new_zeros(num_groups, num_channels).index_add(0, groups, _per_sample_channel_sums(x))
    mean = sums / safe_counts
    centred = x - _broadcast_rows(gather_rows(mean, groups), x)
    squares = x.new_zeros(num_groups, num_channels)
    squares = squares.index_add(0, groups, _per_sample_channel_sums(centred * centred))
    var = squares / safe_counts

    total = counts.sum()
    weights = (counts / total).unsqueeze(1)
    batch_mean = (weights * mean).sum(dim=0)
    # Law of total variance: within-group variance plus the spread of the group means.
    batch_var = (weights * (var + (mean - batch_mean) ** 2)).sum(dim=0)
    return GroupMoments(counts, mean, var, batch_mean, batch_var)


def gather_rows(table: Tensor, groups: Tensor) -> Tensor:
    """``table[groups]`` for a ``(G, C)`` table; ``embedding`` has a much faster backward on the CPU than
    advanced indexing, whose gradient goes through a generic ``index_put``."""
    return torch.nn.functional.embedding(groups, table)


def eligible_groups(counts: Tensor) -> Tensor:
    """Boolean mask of the groups with enough values per channel to have their own statistics."""
    return counts >= MIN_VALUES_PER_GROUP


def statistics_table(moments: GroupMoments, eps: float) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation per group, ``(G, C)`` each, with the documented fallback.

    A group with fewer than two values per channel (one sample of a 1-d feature, say) has no variance to
    speak of; its row is replaced by the whole batch's statistics, so its samples are normalized as
    batch normalization would and the group lends nothing of its own to a mixture.
    """
    usable = eligible_groups(moments.counts).unsqueeze(1)
    mean = torch.where(usable, moments.mean, moments.batch_mean)
    var = torch.where(usable, moments.var, moments.batch_var)
    return mean, torch.sqrt(var + eps)


def group_mix_norm(
    x: Tensor,
    groups: Tensor,
    mixing: Tensor,
    *,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
    output_scale: OutputScale = "batch",
    moments: GroupMoments | None = None,
) -> Tensor:
    """Normalize each group with its own statistics and re-scale all samples with mixed statistics.

    Parameters
    ----------
    x : Tensor
        Features, ``(N, C, *)``.
    groups : Tensor
        Integer group id per sample, ``(N,)``, values in ``[0, num_groups)``.
    mixing : Tensor
        Convex weights over the groups' statistics: ``(G,)`` for one mixture shared by the whole batch,
        or ``(N, G)`` for one mixture per sample. Rows should be non-negative and sum to one.
    num_groups : int
        ``G``, the number of rows of the statistics table.
    weight, bias : Tensor, optional
        Per-channel affine parameters applied last, ``(C,)``.
    eps : float
        Added to every variance before the square root.
    output_scale : {"batch", "mixed"}
        ``"mixed"`` returns ``sigma_mix * (x - mu_g) / sigma_g + mu_mix`` (the paper's layer, in the units
        of the input). ``"batch"`` additionally expresses that result in units of the whole batch's
        statistics, ``(. - mu_batch) / sigma_batch``, which makes the layer a drop-in replacement for batch
        normalization: with a single group it *is* batch normalization.
    moments : GroupMoments, optional
        Precomputed :func:`group_moments` of ``x`` (the module passes them to avoid a second reduction).

    Returns
    -------
    Tensor
        Same shape as ``x``. In each channel every group leaves with the same mean and standard
        deviation when ``mixing`` is shared.
    """
    if moments is None:
        moments = group_moments(x, groups, num_groups)
    table_mean, table_std = statistics_table(moments, eps)
    mixed_mean, mixed_std = mixing @ table_mean, mixing @ table_std
    if output_scale == "batch":
        # Fold the batch reference into the mixed statistics: (m + s*z - mu_B) / sigma_B.
        batch_std = torch.sqrt(moments.batch_var + eps)
        mixed_mean, mixed_std = (mixed_mean - moments.batch_mean) / batch_std, mixed_std / batch_std
    if mixing.dim() == 1:
        # One mixture: every member of a group gets the same affine map, so build the maps per group
        # (cheap, G x C) and gather them once.
        group_scale = mixed_std / table_std
        group_shift = mixed_mean - table_mean * group_scale
        scale, shift = gather_rows(torch.cat([group_scale, group_shift], dim=1), groups).chunk(2, dim=1)
    else:
        own_mean, own_std = gather_rows(torch.cat([table_mean, table_std], dim=1), groups).chunk(2, dim=1)
        scale = mixed_std / own_std
        shift = mixed_mean - own_mean * scale
    return apply_affine(torch.addcmul(_broadcast_rows(shift, x), x, _broadcast_rows(scale, x)), weight, bias)


def normalize_with(
    x: Tensor,
    mean: Tensor,
    std: Tensor,
    mixed_mean: Tensor,
    mixed_std: Tensor,
    *,
    reference_mean: Tensor | None = None,
    reference_std: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
) -> Tensor:
    """The evaluation-time transform with fixed statistics.

    ``mean`` and ``std`` are ``(C,)`` (the population) or ``(N, C)`` (each sample's group); the result is
    ``mixed_std * (x - mean) / std + mixed_mean``, then, if a reference is given, expressed in its units,
    then the affine. Everything is a per-channel (or per-sample, per-channel) affine map, so it traces and
    exports as plain arithmetic.
    """
    scale = mixed_std / std
    shift = mixed_mean - mean * scale
    if reference_mean is not None and reference_std is not None:
        scale = scale / reference_std
        shift = (shift - reference_mean) / reference_std
    if scale.dim() == 1:
        scale, shift = scale.unsqueeze(0), shift.unsqueeze(0)
    return apply_affine(x * _broadcast_rows(scale, x) + _broadcast_rows(shift, x), weight, bias)


def batch_norm_train(x: Tensor, moments: GroupMoments, *, eps: float, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Plain batch normalization with the batch statistics already in ``moments``."""
    std = torch.sqrt(moments.batch_var + eps)
    return normalize_with(x, moments.batch_mean, std, torch.zeros_like(std), torch.ones_like(std), weight=weight, bias=bias)


def apply_affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def shared_mixing_weights(counts: Tensor, alpha: float) -> Tensor:
    """One Dirichlet(alpha) draw over the groups eligible in this batch, ``(G,)``.

    Absent groups and groups too small for their own statistics get weight zero. If no group is eligible,
    every present group gets equal weight (their table rows are then all the batch statistics anyway).
    Draws come from torch's global generator, so ``torch.manual_seed`` makes them repeatable.
    """
    eligible = eligible_groups(counts)
    if not bool(eligible.any()):
        eligible = counts > 0
    concentration = torch.full(counts.shape, float(alpha), dtype=counts.dtype, device=counts.device)
    draws = Gamma(concentration, torch.ones_like(concentration), validate_args=False).sample() * eligible
    return draws / draws.sum()


def pairwise_mixing_weights(counts: Tensor, groups: Tensor, alpha: float) -> Tensor:
    """Per-sample mixing in the style of MixStyle, ``(N, G)``.

    Each sample mixes its own group's statistics with those of one other eligible group drawn uniformly,
    with weight ``lambda ~ Beta(alpha, alpha)`` on its own group. A sample whose group is the only eligible
    one keeps its own statistics.
    """
    num_samples, num_groups = groups.shape[0], counts.shape[0]
    own = torch.nn.functional.one_hot(groups, num_groups).to(counts.dtype)
    candidates = eligible_groups(counts).unsqueeze(0) & (own == 0)
    # Uniform choice among each row's candidates: the largest of uniform scores over the allowed entries.
    scores = torch.rand(num_samples, num_groups, dtype=counts.dtype, device=counts.device)
    partner = torch.where(candidates, scores + 1.0, torch.zeros_like(scores)).argmax(dim=1)
    partner = torch.where(candidates.any(dim=1), partner, groups)

    concentration = torch.full((num_samples,), float(alpha), dtype=counts.dtype, device=counts.device)
    lam = Beta(concentration, concentration, validate_args=False).sample().unsqueeze(1)
    partner_one_hot = torch.nn.functional.one_hot(partner, num_groups).to(counts.dtype)
    return lam * own + (1 - lam) * partner_one_hot


def alignment_penalty(
    x: Tensor, groups: Tensor, moments: GroupMoments, *, eps: float, covariance: bool = False, quantiles: int = 0
) -> Tensor:
    """How far the groups' statistics of ``x`` are from the batch's, in batch-standardized units.

    ``sum_g pi_g * mean_c[((mu_g - mu_B) / sigma_B)^2 + ((sigma_g - sigma_B) / sigma_B)^2]`` over the
    eligible groups, ``pi_g`` their shares of the batch. With ``covariance=True`` the squared Frobenius
    distance between each group's and the batch's channel covariance (of the standardized features,
    divided by ``C^2``) is added. GroupMixNorm removes these differences from its *output*; adding this
    penalty to the loss also removes them from its *input*, so a model evaluated without the protected
    attribute sees group-free features too.

    With ``quantiles=k > 0`` the whole per-channel distributions are compared instead of two moments: the
    squared distance between each group's and the batch's ``k`` quantiles (a 1-D Wasserstein-2 estimate).
    Equal means and deviations leave the shapes free, and a confident classifier's scores differ between
    groups through their shapes; on a single channel (the logit) matching quantiles bounds every
    demographic-parity gap.
    """
    if quantiles > 0:
        return quantile_alignment_penalty(x, groups, moments, eps=eps, levels=quantiles)
    usable = eligible_groups(moments.counts)
    shares = (moments.counts * usable) / (moments.counts * usable).sum().clamp_min(1)
    batch_std = torch.sqrt(moments.batch_var + eps)
    mean_term = ((moments.mean - moments.batch_mean) / batch_std) ** 2
    std_term = ((torch.sqrt(moments.var + eps) - batch_std) / batch_std) ** 2
    penalty = (shares * (mean_term + std_term).mean(dim=1)).sum()
    if covariance:
        penalty = penalty + _covariance_penalty(x, groups, moments, batch_std, shares)
    return penalty


def quantile_alignment_penalty(x: Tensor, groups: Tensor, moments: GroupMoments, *, eps: float, levels: int) -> Tensor:
    """``sum_g pi_g mean_{c,u} ((Q_g(u) - Q_B(u)) / sigma_B)^2`` at ``levels`` evenly spaced quantile levels.

    Vectorized over groups: values are sorted per channel, then stably by group, so each group's sorted
    values sit in one contiguous run; every group's quantiles are then one ``gather``. Quantiles use the
    nearest rank, which keeps the gradient a permutation of the upstream one.
    """
    values = x.transpose(0, 1).flatten(1) if x.dim() > 2 else x.T  # (C, values)
    value_groups = groups.repeat_interleave(x[0, 0].numel()) if x.dim() > 2 else groups
    sorted_values, order = values.sort(dim=1)
    by_group = value_groups[order].sort(dim=1, stable=True)
    grouped = sorted_values.gather(1, by_group.indices)  # per channel: group 0's values ascending, then 1's...
    counts = moments.counts.long()
    starts = torch.cumsum(counts, 0) - counts
    level = torch.linspace(0.0, 1.0, levels, dtype=x.dtype, device=x.device)
    rank = (level.unsqueeze(0) * (counts - 1).clamp_min(0).unsqueeze(1)).round().long()  # (G, levels)
    # Absent groups would index past the end; they take no share, so any valid index will do.
    index = (starts.unsqueeze(1) + rank).clamp_max(values.shape[1] - 1).flatten().unsqueeze(0)
    index = index.expand(values.shape[0], -1)
    group_quantiles = grouped.gather(1, index).view(values.shape[0], -1, levels)  # (C, G, levels)
    batch_rank = (level * (values.shape[1] - 1)).round().long()
    batch_quantiles = sorted_values[:, batch_rank].unsqueeze(1)  # (C, 1, levels)
    batch_std = torch.sqrt(moments.batch_var + eps).view(-1, 1, 1)
    distance = ((group_quantiles - batch_quantiles) / batch_std).pow(2).mean(dim=(0, 2))  # (G,)
    usable = eligible_groups(moments.counts)
    shares = (moments.counts * usable) / (moments.counts * usable).sum().clamp_min(1)
    return (shares * distance).sum()


def _covariance_penalty(x: Tensor, groups: Tensor, moments: GroupMoments, batch_std: Tensor, shares: Tensor) -> Tensor:
    features = x.transpose(0, 1).flatten(1).transpose(0, 1) if x.dim() > 2 else x  # (values, C)
    value_groups = groups.repeat_interleave(x[0, 0].numel()) if x.dim() > 2 else groups
    standardized = (features - moments.batch_mean) / batch_std
    batch_cov = standardized.T @ standardized / standardized.shape[0]
    one_hot = torch.nn.functional.one_hot(value_groups, moments.counts.shape[0]).to(x.dtype)
    # Second moments about the batch mean, per group, from one batched product: (G, C, C).
    group_second = torch.einsum("ng,nc,nd->gcd", one_hot, standardized, standardized)
    group_second = group_second / moments.counts.clamp_min(1).view(-1, 1, 1)
    difference = group_second - batch_cov
    channels = standardized.shape[1]
    return (shares * difference.pow(2).sum(dim=(1, 2))).sum() / channels**2
