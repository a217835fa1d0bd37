"""Alignment penalties: how far each group's distribution of a layer's input is from the batch's.

A loss, not part of the normalization. GroupMixNorm removes the groups' differences from its *output*;
adding one of these penalties to the training loss also removes them from its *input*, so that a model
evaluated without the protected attribute sees group-free features too. The layers report them inside
:func:`~groupmixnorm.nn.collect_alignment`; :func:`groupmixnorm.nn.functional` re-exports them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from groupmixnorm.nn._core import GroupMoments, broadcast_rows, eligible_groups, values_per_sample
from groupmixnorm.nn._kernels import group_moments


def _group_shares(counts: Tensor) -> Tensor:
    """Each eligible group's share of the eligible values, ``(G,)``; other groups take none."""
    eligible = counts * eligible_groups(counts)
    return eligible / eligible.sum().clamp_min(1)


def alignment_penalty(
    x: Tensor, groups: Tensor, moments: GroupMoments, *, eps: float, covariance: bool = False, quantiles: int = 0,
    projections: int = 0,
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

    With ``projections=k > 0`` the quantiles (``quantiles`` of them, 16 if 0) are compared along ``k``
    random directions of the batch-standardized channels instead of along the channels
    (:func:`sliced_alignment_penalty`): a group difference spread thinly over many correlated channels
    adds up along a direction, where every single channel's share of it is small.
    """
    if projections > 0:
        return sliced_alignment_penalty(x, groups, moments, eps=eps, directions=projections, levels=quantiles or 16)
    if quantiles > 0:
        return quantile_alignment_penalty(x, groups, moments, eps=eps, levels=quantiles)
    shares = _group_shares(moments.counts)
    batch_std = torch.sqrt(moments.batch_var + eps)
    mean_term = ((moments.mean - moments.batch_mean) / batch_std) ** 2
    std_term = ((torch.sqrt(moments.var + eps) - batch_std) / batch_std) ** 2
    penalty = (shares * (mean_term + std_term).mean(dim=1)).sum()
    if covariance:
        penalty = penalty + _covariance_penalty(x, groups, moments, batch_std, shares)
    return penalty


def conditional_alignment_penalty(
    x: Tensor, groups: Tensor, num_groups: int, condition: Tensor, *, eps: float, covariance: bool = False,
    quantiles: int = 0, projections: int = 0,
) -> Tensor:
    """:func:`alignment_penalty` within each value of ``condition`` (the label, for equalized odds), the
    parts weighted by their shares of the batch; values held by fewer than two samples are skipped."""
    condition = condition.to(x.device).long()
    total = x.new_zeros(())
    for value in torch.unique(condition):  # a handful of label values, not groups
        members = condition == value
        if int(members.sum()) < 2:
            continue
        moments = group_moments(x[members], groups[members], num_groups)
        share = members.to(x.dtype).mean()
        total = total + share * alignment_penalty(
            x[members], groups[members], moments, eps=eps, covariance=covariance, quantiles=quantiles,
            projections=projections,
        )
    return total


def quantile_alignment_penalty(x: Tensor, groups: Tensor, moments: GroupMoments, *, eps: float, levels: int) -> Tensor:
    """``sum_g pi_g mean_{c,u} ((Q_g(u) - Q_B(u)) / sigma_B)^2`` at ``levels`` evenly spaced quantile levels.

    Quantiles use the nearest rank, so each one *is* an input value and its gradient flows to that value
    alone. Which values they are is found without autograd (a sort per channel, then a stable sort by
    group, which leaves each group's values ascending in one contiguous run); the graph then holds a single
    ``gather``, which keeps the backward pass cheap. Vectorized over groups and channels.
    """
    values = x.transpose(0, 1).flatten(1) if x.dim() > 2 else x.T  # (C, values)
    with torch.no_grad():
        picks, num_groups = _quantile_positions(values, groups, moments.counts, values_per_sample(x), levels)
    picked = values.gather(1, picks)
    group_quantiles = picked[:, : num_groups * levels].view(values.shape[0], num_groups, levels)
    batch_quantiles = picked[:, num_groups * levels :].unsqueeze(1)  # (C, 1, levels)
    batch_std = torch.sqrt(moments.batch_var + eps).view(-1, 1, 1)
    distance = ((group_quantiles - batch_quantiles) / batch_std).pow(2).mean(dim=(0, 2))  # (G,)
    return (_group_shares(moments.counts) * distance).sum()


def sliced_alignment_penalty(
    x: Tensor, groups: Tensor, moments: GroupMoments, *, eps: float, directions: int, levels: int
) -> Tensor:
    """:func:`quantile_alignment_penalty` of the projections of the batch-standardized ``x`` on
    ``directions`` random unit vectors of channel space: a sliced Wasserstein-2 distance between each
    group's and the batch's distribution. The directions are drawn anew on every call, from torch's
    global generator, so over training they cover the space."""
    standardized = (x - broadcast_rows(moments.batch_mean, x)) / broadcast_rows(torch.sqrt(moments.batch_var + eps), x)
    basis = torch.randn(x.shape[1], directions, dtype=x.dtype, device=x.device)
    basis = basis / basis.norm(dim=0, keepdim=True)
    projected = torch.einsum("nc...,ck->nk...", standardized, basis)  # (N, directions, *)
    projected_moments = group_moments(projected, groups, moments.counts.shape[0])
    return quantile_alignment_penalty(projected, groups, projected_moments, eps=eps, levels=levels)


def _quantile_positions(
    values: Tensor, groups: Tensor, counts: Tensor, per_sample: int, levels: int
) -> tuple[Tensor, int]:
    """Column indices into ``values`` (C, M) of every group's quantiles, then the batch's: (C, (G + 1) * levels)."""
    value_groups = groups.repeat_interleave(per_sample) if per_sample > 1 else groups
    order = values.argsort(dim=1)
    by_group = value_groups[order].argsort(dim=1, stable=True)
    grouped = order.gather(1, by_group)  # per channel: group 0's positions by ascending value, then 1's...
    counts = counts.long()
    starts = torch.cumsum(counts, 0) - counts
    level = torch.linspace(0.0, 1.0, levels, dtype=torch.float64, device=values.device)
    rank = (level.unsqueeze(0) * (counts - 1).clamp_min(0).unsqueeze(1)).round().long()  # (G, levels)
    # Absent groups would index past the end; they take no share, so any valid index will do.
    index = (starts.unsqueeze(1) + rank).clamp_max(values.shape[1] - 1).flatten()
    batch_rank = (level * (values.shape[1] - 1)).round().long()
    picks = torch.cat([grouped[:, index], order[:, batch_rank]], dim=1)
    return picks, counts.shape[0]


def _covariance_penalty(x: Tensor, groups: Tensor, moments: GroupMoments, batch_std: Tensor, shares: Tensor) -> Tensor:
    features = x.transpose(0, 1).flatten(1).transpose(0, 1) if x.dim() > 2 else x  # (values, C)
    value_groups = groups.repeat_interleave(values_per_sample(x)) if x.dim() > 2 else groups
    standardized = (features - moments.batch_mean) / batch_std
    batch_cov = standardized.T @ standardized / standardized.shape[0]
    one_hot = torch.nn.functional.one_hot(value_groups, moments.counts.shape[0]).to(x.dtype)
    # Second moments about the batch mean, per group, from one batched product: (G, C, C).
    group_second = torch.einsum("ng,nc,nd->gcd", one_hot, standardized, standardized)
    group_second = group_second / moments.counts.clamp_min(1).view(-1, 1, 1)
    difference = group_second - batch_cov
    channels = standardized.shape[1]
    return (shares * difference.pow(2).sum(dim=(1, 2))).sum() / channels**2
