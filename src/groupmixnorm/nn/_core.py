"""What the reference, the fused kernels, SyncGroupMixNorm and the alignment penalties share, written once.

The moments tuple, the input's shapes, and the layer's small rules: which groups have statistics of their
own, the statistics table with its batch fallback, the batch's moments from the groups', and the one map
``y = scale * x + shift`` that the training-time layer (and evaluation) applies. Depends on torch alone.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

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

    def detach(self) -> GroupMoments:
        """The same statistics outside the autograd graph (for the running statistics)."""
        return GroupMoments(*(t.detach() for t in self))


# ----------------------------------------------------------------------------------------------- shapes


def values_per_sample(x: Tensor) -> int:
    """How many values each sample contributes to a channel: the product of the spatial sizes."""
    return math.prod(x.shape[2:])


def per_sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's mean and biased variance per channel over its positions, ``(N, C)`` each (the variance
    is 0 for input without spatial axes)."""
    values = x.flatten(2) if x.dim() > 2 else x.unsqueeze(2)  # (N, C, positions)
    return values.mean(dim=2), values.var(dim=2, unbiased=False)


def per_sample_channel_sums(x: Tensor) -> Tensor:
    """Sum over the spatial axes: ``(N, C, *) -> (N, C)``."""
    return x.flatten(2).sum(dim=2) if x.dim() > 2 else x


def broadcast_rows(stat: Tensor, x: Tensor) -> Tensor:
    """Reshape ``(N, C)`` (per-sample) or ``(C,)`` (per-channel) statistics to broadcast against ``(N, C, *)``."""
    return stat.reshape(stat.shape + (1,) * (x.dim() - 2)) if x.dim() > 2 else stat


# ------------------------------------------------------------------------------------------------ rules


def eligible_groups(counts: Tensor) -> Tensor:
    """Boolean mask of the groups with enough values per channel to have their own statistics."""
    return counts >= MIN_VALUES_PER_GROUP


def mixable_groups(counts: Tensor) -> Tensor:
    """The groups a mixture may weight: the eligible ones or, if none is, every present group (whose table
    rows are then all the batch statistics anyway)."""
    eligible = eligible_groups(counts)
    return torch.where(eligible.any(), eligible, counts > 0)  # no host sync: traceable without a graph break


def batch_moments(counts: Tensor, mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
    """The whole batch's mean and biased variance from the groups' (the law of total variance): the
    count-weighted averages of the group means and of ``var_g + (mean_g - batch_mean)^2``."""
    shares = counts / counts.sum()
    batch_mean = shares @ mean
    return batch_mean, shares @ ((mean - batch_mean).square() + var)


def combined_moments(counts: Tensor, means: Tensor, variances: Tensor) -> GroupMoments:
    """Group moments over several parts (processes, or strata of one batch) from each part's counts
    ``(P, G)``, means and biased variances ``(P, G, C)``, by the law of total variance; the batch's follow
    from the groups' as in every layer. A group absent from a part (count 0) takes nothing from it."""
    total = counts.sum(0)
    shares = (counts / total.clamp_min(1)).unsqueeze(2)
    mean = (shares * means).sum(0)
    var = (shares * (variances + (means - mean).square())).sum(0)
    return GroupMoments(total, mean, var, *batch_moments(total, mean, var))


def batch_reference(moments: GroupMoments, eps: float) -> tuple[Tensor, Tensor]:
    """The batch's mean and standard deviation ``sqrt(var + eps)``, ``(C,)`` each."""
    return moments.batch_mean, torch.sqrt(moments.batch_var + eps)


def statistics_table(moments: GroupMoments, eps: float, *, all_eligible: bool = False) -> tuple[Tensor, Tensor]:
    """Mean and standard deviation per group, ``(G, C)`` each, with the documented fallback.

    A group with fewer than two values per channel (one sample of a 1-d feature, say) has no variance to
    speak of; its row is replaced by the whole batch's statistics, so its samples are normalized as
    batch normalization would and the group lends nothing of its own to a mixture. ``all_eligible`` says,
    if known, that no row needs the fallback.
    """
    mean, var = moments.mean, moments.var
    if not all_eligible:
        usable = eligible_groups(moments.counts).unsqueeze(1)
        mean, var = torch.where(usable, mean, moments.batch_mean), torch.where(usable, var, moments.batch_var)
    return mean, torch.sqrt(var + eps)


def output_map(
    weight: Tensor | None, bias: Tensor | None, reference: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor | None, Tensor | None]:
    """The per-channel map ``u -> u * factor + offset`` applied after mixing, ``(C,)`` each or ``None``.

    It folds the expression in a reference's units, ``(u - mean) / std`` for ``reference = (mean, std)``
    (the batch's with ``output_scale="batch"``), and the affine ``* weight + bias``.
    """
    if reference is None:
        return weight, bias
    mean, std = reference
    factor = std.reciprocal() if weight is None else weight / std
    offset = -(mean * factor) if bias is None else torch.addcmul(bias, mean, factor, value=-1)
    return factor, offset


def normalization_map(
    mean: Tensor,
    std: Tensor,
    mixed_mean: Tensor | None,
    mixed_std: Tensor | None,
    factor: Tensor | None = None,
    offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The layer's one map, ``y = scale * x + shift = scale * (x - mean) + level``, as ``(scale, shift, level)``.

    Standardize with ``(mean, std)``, give the result the mixed statistics, then apply ``u * factor +
    offset`` (:func:`output_map`)::

        scale = mixed_std * factor / std,   level = mixed_mean * factor + offset,   shift = level - mean * scale

    ``None`` leaves a part out (a mixture of mean 0 and deviation 1, factor 1, offset 0; ``level`` is then
    ``None`` for 0). In training ``mean`` and ``std`` are the ``(G, C)`` statistics table and the rest
    ``(C,)``, so the map is one per group; in evaluation they are fixed ``(C,)`` or ``(N, C)`` statistics.
    """
    spread = mixed_std if factor is None else factor if mixed_std is None else mixed_std * factor
    scale = std.reciprocal() if spread is None else spread / std
    level = offset if mixed_mean is None else apply_affine(mixed_mean, factor, offset)
    shift = -(mean * scale) if level is None else torch.addcmul(level, mean, scale, value=-1)
    return scale, shift, level


def apply_affine(x: Tensor, scale: Tensor | None, shift: Tensor | None) -> Tensor:
    """``x * scale + shift`` per channel, with ``(C,)`` (every sample alike) or ``(N, C)`` (one per sample)
    coefficients broadcast over the spatial axes; ``None`` leaves a part out. Per-group tables go through
    :func:`groupmixnorm.nn._kernels.group_affine`."""
    if scale is None:
        return x if shift is None else x + broadcast_rows(shift, x)
    scale = broadcast_rows(scale, x)
    return x * scale if shift is None else torch.addcmul(broadcast_rows(shift, x), x, scale)
