"""GroupMixNorm as functions: the math of the layer, plainly, then the fast path that the layers train with.

Shapes: ``x`` is ``(N, C, *)`` (channels second, any number of trailing spatial axes, as in
``torch.nn.BatchNorm*``), ``groups`` is ``(N,)`` with integer ids in ``[0, G)``.

**The math.** Each group ``g`` of the batch has its own per-channel mean and (biased) variance over its
samples and spatial positions (:func:`plain_group_moments`); the batch's follow from the groups'. A group
with fewer than two values per channel has no variance to speak of: its row of the *statistics table*
``(mu_g, sigma_g)``, ``sigma = sqrt(var + eps)``, holds the batch's statistics instead
(:func:`statistics_table`). A mixture ``w`` over the groups (a Dirichlet draw shared by the batch, or one
per sample) gives the mixed statistics ``mu_mix = sum_g w_g mu_g`` and ``sigma_mix = sum_g w_g sigma_g``,
and every sample ``x`` of group ``g`` leaves with::

    y = sigma_mix * (x - mu_g) / sigma_g + mu_mix                          (output_scale="mixed")
    y = (sigma_mix * (x - mu_g) / sigma_g + mu_mix - mu_B) / sigma_B       (output_scale="batch")

then ``y * weight + bias``. With one shared mixture every group leaves with the same mean and deviation.
Per group this is one affine map, ``y = scale[g] * x + shift[g]`` (:func:`~._core.normalization_map`),
which is also what evaluation applies with running statistics (:func:`normalize_with`).

**Reading order.** :func:`group_mix_norm` is the reference: ordinary autograd, differentiable twice and
traceable by ``torch.compile``. The mixing draws follow. :func:`fused_group_mix_norm` is the fast path:
the same numbers through hand-written autograd functions (:mod:`groupmixnorm.nn._kernels`), several
times faster, first derivatives only; the layers train with it outside
:func:`~groupmixnorm.nn.use_reference`. On the CPU a shared mixture runs as two compiled numba loops each
way (:mod:`groupmixnorm.nn._fused_cpu`, which says when). The small rules both use live in :mod:`groupmixnorm.nn._core`,
the alignment penalties (a loss, not the normalization) in :mod:`groupmixnorm.nn.alignment`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from groupmixnorm.nn._core import (
    MIN_VALUES_PER_GROUP,
    GroupMoments,
    OutputScale,
    apply_affine,
    batch_moments,
    batch_reference,
    broadcast_rows,
    eligible_groups,
    mixable_groups,
    normalization_map,
    output_map,
    per_sample_channel_sums,
    per_sample_moments,
    statistics_table,
    values_per_sample,
)
from groupmixnorm.nn._kernels import (
    counts_and_segments,
    gather_rows,
    group_affine,
    group_counts,
    group_moments,
    mix_with_moments,
    shared_mix_norm,
)
from groupmixnorm.nn.alignment import (
    alignment_penalty,
    conditional_alignment_penalty,
    quantile_alignment_penalty,
    sliced_alignment_penalty,
)

__all__ = [
    "MIN_VALUES_PER_GROUP", "GroupMoments", "OutputScale", "alignment_penalty", "apply_affine", "batch_norm_train",
    "conditional_alignment_penalty", "eligible_groups", "fused_group_mix_norm", "gamma_draws", "gather_rows",
    "group_affine", "group_counts", "group_mix_norm", "group_moments", "mix_normalize", "normalize_with",
    "pairwise_mixing_weights", "plain_group_moments", "posterior_group_weights", "quantile_alignment_penalty",
    "shared_mixing_weights", "sliced_alignment_penalty", "statistics_table", "uniform_mixing_weights",
    "weights_from_gamma",
]


# ------------------------------------------------------------------------------------------ the reference


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
) -> Tensor:
    """Normalize each group with its own statistics and re-scale all samples with mixed statistics.

    The layer's math (the module docstring) in ordinary autograd: it supports double backward and
    ``torch.compile``. The layers use the fused equivalent (:func:`fused_group_mix_norm`, tested against
    this one) for speed, and this one inside :func:`~groupmixnorm.nn.use_reference` and compiled graphs.

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
        ``"mixed"`` is the paper's layer, in the units of the input. ``"batch"`` expresses that result in
        units of the whole batch's statistics, which makes the layer a drop-in replacement for batch
        normalization: with a single group it *is* batch normalization.

    Returns
    -------
    Tensor
        Same shape as ``x``. In each channel every group leaves with the same mean and standard
        deviation when ``mixing`` is shared.
    """
    moments = plain_group_moments(x, groups, num_groups)
    return mix_normalize(x, groups, mixing, moments, eps=eps, output_scale=output_scale, weight=weight, bias=bias)


def plain_group_moments(x: Tensor, groups: Tensor, num_groups: int) -> GroupMoments:
    """:func:`group_moments` in ordinary autograd: the group means, then the centred second moments (two
    passes keep the variance accurate when the mean is large relative to the spread)."""
    # index_add, not bincount, whose output size depends on the ids' values (a graph break when compiled)
    counts = x.new_zeros(num_groups).index_add(0, groups, x.new_ones(groups.shape)) * values_per_sample(x)
    per_count = counts.clamp_min(1).unsqueeze(1)
    mean = _segment_sum(x, groups, num_groups) / per_count
    var = _segment_sum((x - broadcast_rows(mean[groups], x)).square(), groups, num_groups) / per_count
    return GroupMoments(counts, mean, var, *batch_moments(counts, mean, var))


def _segment_sum(values: Tensor, groups: Tensor, num_groups: int) -> Tensor:
    """``(N, C, *) -> (G, C)``: the sum over each group's samples and spatial positions."""
    rows = per_sample_channel_sums(values)
    return rows.new_zeros(num_groups, rows.shape[1]).index_add(0, groups, rows)


def mix_normalize(
    x: Tensor,
    groups: Tensor,
    mixing: Tensor,
    moments: GroupMoments,
    *,
    eps: float,
    output_scale: OutputScale,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """The second half of :func:`group_mix_norm`, from given moments, in ordinary autograd."""
    table_mean, table_std = statistics_table(moments, eps)
    mixed_mean, mixed_std = mixing @ table_mean, mixing @ table_std  # (C,) shared, (N, C) per sample
    own_mean, own_std = broadcast_rows(table_mean[groups], x), broadcast_rows(table_std[groups], x)
    y = broadcast_rows(mixed_std, x) * (x - own_mean) / own_std + broadcast_rows(mixed_mean, x)
    if output_scale == "batch":
        batch_mean, batch_std = batch_reference(moments, eps)
        y = (y - broadcast_rows(batch_mean, x)) / broadcast_rows(batch_std, x)
    return apply_affine(y, weight, bias)


# --------------------------------------------------------------------------------------- the mixing draws


def shared_mixing_weights(counts: Tensor, alpha: float, *, all_eligible: bool | None = None) -> Tensor:
    """One Dirichlet(alpha) draw over the groups eligible in this batch, ``(G,)``.

    Absent groups and groups too small for their own statistics get weight zero. If no group is eligible,
    every present group gets equal weight (their table rows are then all the batch statistics anyway).
    Draws come from torch's global generator, so ``torch.manual_seed`` makes them repeatable.
    ``all_eligible`` may say, if already known, whether every group is eligible.
    """
    return weights_from_gamma(gamma_draws(counts, alpha), counts, all_eligible=all_eligible)


def gamma_draws(counts: Tensor, alpha: float) -> Tensor:
    """One Gamma(alpha, 1) draw per group, like ``counts``: what ``Gamma(...).sample()`` computes, without
    building a distribution object per batch."""
    return torch._standard_gamma(torch.full(counts.shape, float(alpha), dtype=counts.dtype, device=counts.device))


def weights_from_gamma(draws: Tensor, counts: Tensor, *, all_eligible: bool | None = None) -> Tensor:
    """Dirichlet weights from Gamma draws: the draws of the groups a mixture may weight
    (:func:`~._core.mixable_groups`), normalized to sum to one."""
    weights = draws.clamp_min(torch.finfo(draws.dtype).tiny)
    if not all_eligible:
        weights = weights * mixable_groups(counts)
    return weights / weights.sum()


def uniform_mixing_weights(counts: Tensor) -> Tensor:
    """The mean of :func:`shared_mixing_weights`: equal weight on every group a mixture may weight."""
    mixable = mixable_groups(counts).to(counts.dtype)
    return mixable / mixable.sum()


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

    # What Beta(alpha, alpha).sample() computes (the first coordinate of a Dirichlet draw), without
    # building distribution objects per batch.
    concentration = torch.full((num_samples, 2), float(alpha), dtype=counts.dtype, device=counts.device)
    lam = torch._sample_dirichlet(concentration)[:, :1]
    partner_one_hot = torch.nn.functional.one_hot(partner, num_groups).to(counts.dtype)
    return torch.addcmul((1 - lam) * partner_one_hot, lam, own)


# ------------------------------------------------------------------------------------------ the fast path


def fused_group_mix_norm(
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
    """:func:`group_mix_norm` through the hand-written autograd functions: the same values and gradients,
    several times faster on small batches, first derivatives only.

    A shared mixture runs as one fused function that computes the moments itself. Precomputed
    :func:`group_moments` of ``x`` (or synchronized ones) may be passed instead; the ``(G, C)`` arithmetic
    then runs in ordinary autograd and the batch-sized map through :func:`group_affine`.
    """
    counts, segments = counts_and_segments(groups, num_groups, values_per_sample(x), x.dtype)
    options = {"eps": eps, "output_scale": output_scale, "weight": weight, "bias": bias}
    if moments is None and mixing.dim() == 1:
        return shared_mix_norm(x, segments, counts, mixing, **options)[0]
    if moments is None:
        moments = group_moments(x, groups, num_groups, counts=counts, segments=segments)
    return mix_with_moments(x, segments, mixing, moments, **options)


# ------------------------------------------------------------------------ the map with fixed statistics


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
    reference = None if reference_mean is None or reference_std is None else (reference_mean, reference_std)
    factor, offset = output_map(weight, bias, reference)
    scale, shift, _ = normalization_map(mean, std, mixed_mean, mixed_std, factor, offset)
    return apply_affine(x, scale, shift)


def posterior_group_weights(x: Tensor, group_mean: Tensor, group_var: Tensor, *, eps: float,
                            known: Tensor | None = None) -> Tensor:
    """Each sample's posterior probability of every group, ``(N, G)``, from the groups' statistics alone.

    Every group is modelled as independent Gaussians per channel, ``N(group_mean[g], group_var[g] + eps)``
    (``(G, C)`` each, the layer's running group statistics), with equal prior weight on the ``known`` groups
    (``(G,)`` booleans; default all); a sample's likelihood is the product over its channels and positions.
    Mixing the groups' statistics with these weights is what ``eval_mode="posterior"`` normalizes with: the
    group statistics of training, guessed from ``x`` instead of read from a protected attribute.
    """
    positions = values_per_sample(x)
    sample_mean, within = per_sample_moments(x)
    # sum over positions of (x - mu)^2 = positions * (within-sample variance + (sample mean - mu)^2)
    within = within.unsqueeze(1)
    var = group_var + eps
    squares = (sample_mean.unsqueeze(1) - group_mean.unsqueeze(0)).square() + within  # (N, G, C)
    log_likelihood = -0.5 * positions * (squares / var + var.log()).sum(dim=2)
    if known is not None:
        log_likelihood = log_likelihood.masked_fill(~known, float("-inf"))
    return torch.softmax(log_likelihood, dim=1)


def batch_norm_train(x: Tensor, moments: GroupMoments, *, eps: float, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """Plain batch normalization with the batch statistics already in ``moments``."""
    return apply_affine(x, *output_map(weight, bias, batch_reference(moments, eps)))
