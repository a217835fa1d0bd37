"""The fast path's machinery: segment sums, blocked passes and hand-written autograd functions.

:func:`groupmixnorm.nn.functional.group_mix_norm` is the layer's math in plain autograd. This module
computes the same numbers faster, first derivatives only: group moments by segment sums
(:class:`_Segments`), the per-group map ``y = x * scale[g] + shift[g]`` of :func:`~._core.normalization_map`
(:func:`group_affine`), and, for one mixture shared by the batch, the whole training-time layer as one
autograd function (:class:`_SharedMixFunction`) whose backward is the chain rule written out. Large 2D
inputs are processed in blocks of rows that stay in the CPU cache. Tests hold every function here to the
reference (values and gradients, every shape and degenerate batch).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from groupmixnorm.nn import _fused_cpu
from groupmixnorm.nn._core import (
    GroupMoments,
    OutputScale,
    apply_affine,
    batch_moments,
    batch_reference,
    broadcast_rows,
    eligible_groups,
    normalization_map,
    output_map,
    per_sample_channel_sums,
    statistics_table,
    values_per_sample,
)

#: Segment sums of larger inputs (in elements) use ``embedding_bag`` over the rows sorted by group.
_EMBEDDING_BAG_ABOVE = 1 << 16
# The batch-sized passes over a large 2D input run over blocks of rows, so that the gathered per-group
# tables and other temporaries of a block stay in the CPU cache instead of making a round trip through
# memory; each pass then costs little more than reading its inputs and writing its output.
_BLOCK_ELEMENTS = 1 << 17
_BLOCKED_ABOVE = 1 << 19


class _Segments:
    """The batch's rows by group: the ids, and (when first needed) the rows sorted by group.

    Segment sums of a large batch are one ``embedding_bag`` over the rows sorted by group (a fused
    gather-and-sum kernel), several times faster on the CPU than ``index_add``, whose cost per row
    dominates for narrow inputs; sorting once per batch pays for itself from the second sum on. Small
    batches use ``index_add``, which needs no sort (and ``embedding_bag`` runs even tiny inputs in parallel,
    which costs more than it saves). Neither cost depends on the number of groups.
    """

    __slots__ = ("groups", "num_groups", "samples_per_group", "_order", "_starts")

    def __init__(self, groups: Tensor, samples_per_group: Tensor) -> None:
        self.groups = groups
        self.num_groups = samples_per_group.shape[0]
        self.samples_per_group = samples_per_group
        self._order = self._starts = None

    def sum(self, values: Tensor) -> Tensor:
        """``(N, C, *) -> (G, C)``: the sum of every group's rows (and spatial positions)."""
        rows = per_sample_channel_sums(values)
        if rows.numel() < _EMBEDDING_BAG_ABOVE or rows.device.type != "cpu":
            return rows.new_zeros(self.num_groups, rows.shape[1]).index_add_(0, self.groups, rows)
        if self._order is None:
            self._order = torch.argsort(self.groups, stable=True)
            self._starts = self.samples_per_group.cumsum(0).sub_(self.samples_per_group)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return torch.nn.functional.embedding_bag(self._order, rows, self._starts, mode="sum")


def _segments(groups: Tensor, num_groups: int) -> _Segments:
    samples = torch.bincount(groups, minlength=num_groups)
    if samples.shape[0] != num_groups:
        raise IndexError(f"group id {samples.shape[0] - 1} is out of range for a table of {num_groups} groups")
    return _Segments(groups, samples)


def counts_and_segments(
    groups: Tensor, num_groups: int, per_sample: int, dtype: torch.dtype
) -> tuple[Tensor, _Segments]:
    """The values per channel in each group, ``(G,)`` in ``dtype`` (samples times ``per_sample``), and the
    batch's rows by group."""
    segments = _segments(groups, num_groups)
    counts = segments.samples_per_group.to(dtype)
    if per_sample != 1:
        counts = counts * per_sample
    return counts, segments


def group_counts(
    groups: Tensor, num_groups: int, values_per_sample: int = 1, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Number of values per channel in each group, ``(G,)``: samples per group times ``values_per_sample``."""
    return counts_and_segments(groups, num_groups, values_per_sample, dtype)[0]


def every_group_eligible(counts: Tensor) -> bool:
    """Whether every group of the table has its own statistics (the common case, with cheaper arithmetic)."""
    return bool(eligible_groups(counts).all())


def gather_rows(table: Tensor, groups: Tensor) -> Tensor:
    """``table[groups]`` for a ``(G, C)`` table; ``embedding`` has a much faster backward on the CPU than
    advanced indexing, whose gradient goes through a generic ``index_put``."""
    return torch.nn.functional.embedding(groups, table)


def _needs_graph(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _sum_or_none(*terms: Tensor | None) -> Tensor | None:
    present = [t for t in terms if t is not None]
    if not present:
        return None
    total = present[0]
    for term in present[1:]:
        total = total + term
    return total


def _inverse_counts(counts: Tensor) -> Tensor:
    """``1 / max(count, 1)`` as a ``(G, 1)`` column."""
    return counts.clamp_min(1).reciprocal_().unsqueeze_(1)


def _block_rows(x: Tensor) -> int:
    """Rows per block for the batch-sized passes over a 2D input (all of them for small inputs or off the CPU)."""
    rows, channels = x.shape
    if x.numel() <= _BLOCKED_ABOVE or x.device.type != "cpu":
        return max(rows, 1)
    return max(_BLOCK_ELEMENTS // max(channels, 1), 1)


def _rowwise_combine(
    x: Tensor,
    groups: Tensor,
    terms: list[tuple[Tensor, Tensor]],
    offset: Tensor | None,
    block: int,
    out: Tensor | None = None,
    spare: Tensor | None = None,
) -> Tensor:
    """``offset[g] + sum of factor * table[g]`` over ``terms = [(table, factor), ...]`` for a 2D batch.

    ``factor``s are ``(N, C)``, tables ``(G, C)``. ``out`` and ``spare`` may be spent ``(N, C)`` buffers to
    reuse. Works block by block (``block`` rows) with one block-sized temporary.
    """
    if out is None or not out.is_contiguous():
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if spare is not None and not spare.is_contiguous():
        spare = None
    temp = None
    if block >= x.shape[0]:
        pieces = [(groups,), (out,)] + [(factor,) for _, factor in terms]
    else:
        pieces = [groups.split(block), out.split(block)] + [factor.split(block) for _, factor in terms]
    for group_block, out_block, *factor_blocks in zip(*pieces):
        filled = False
        if offset is not None:
            torch.index_select(offset, 0, group_block, out=out_block)
            filled = True
        for (table, _), factor_block in zip(terms, factor_blocks):
            if not filled:
                torch.index_select(table, 0, group_block, out=out_block).mul_(factor_block)
                filled = True
                continue
            if temp is None:
                whole = spare is not None and block >= x.shape[0]
                temp = spare if whole else x.new_empty(min(block, x.shape[0]), x.shape[1])
            if temp.shape[0] != group_block.shape[0]:
                temp = temp[: group_block.shape[0]]
            out_block.addcmul_(factor_block, torch.index_select(table, 0, group_block, out=temp))
        if not filled:
            out_block.zero_()
    return out


# ---------------------------------------------------------------------------------------------- moments


def _moments_forward(
    x: Tensor, segments: _Segments, counts: Tensor, inverse_counts: Tensor, block: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Group means and biased variances, the batch's mean and variance, and two ``(N, C)`` temporaries.

    Two passes (mean, then the centred second moment) keep the variance accurate when the mean is large
    relative to the spread. For a 2D input the temporaries are ``x - mean[g]`` and a spent buffer, which
    the caller may reuse; otherwise both are ``None``.
    """
    mean = segments.sum(x).mul_(inverse_counts)
    centred = spare = None
    if x.dim() > 2:
        var = segments.sum((x - broadcast_rows(gather_rows(mean, segments.groups), x)).square_())
    elif block is not None and block < x.shape[0]:
        var = x.new_zeros(mean.shape)
        temp = x.new_empty(block, x.shape[1])
        for x_block, group_block in zip(x.split(block), segments.groups.split(block)):
            gathered = torch.index_select(mean, 0, group_block, out=temp[: group_block.shape[0]])
            var.index_add_(0, group_block, torch.sub(x_block, gathered, out=gathered).square_())
    else:
        centred = gather_rows(mean, segments.groups)
        torch.sub(x, centred, out=centred)
        spare = torch.square(centred)
        var = segments.sum(spare)
    var.mul_(inverse_counts)
    return (mean, var, *batch_moments(counts, mean, var), centred, spare)


def _table_grads(
    x: Tensor, segments: _Segments, d_out: Tensor, need_scale: bool = True, block: int | None = None
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """``(sum_g d_out * x, sum_g d_out)`` per group and channel, and a spent ``(N, C)`` buffer (2D only)."""
    if x.dim() == 2 and need_scale and block is not None and block < x.shape[0]:
        d_scale = x.new_zeros(segments.num_groups, x.shape[1])
        d_shift = x.new_zeros(segments.num_groups, x.shape[1])
        temp = x.new_empty(block, x.shape[1])
        for x_block, d_block, group_block in zip(x.split(block), d_out.split(block), segments.groups.split(block)):
            d_scale.index_add_(0, group_block, torch.mul(d_block, x_block, out=temp[: group_block.shape[0]]))
            d_shift.index_add_(0, group_block, d_block)
        return d_scale, d_shift, None
    product = d_out * x if need_scale else None
    d_scale = segments.sum(product) if need_scale else None
    return d_scale, segments.sum(d_out), product if x.dim() == 2 else None


def _moments_input_grad(
    x: Tensor,
    groups: Tensor,
    inverse_counts: Tensor,
    mean: Tensor,
    batch_mean: Tensor,
    d_mean: Tensor | None,
    d_var: Tensor | None,
    d_batch_mean: Tensor | None,
    d_batch_var: Tensor | None,
    *,
    d_out: Tensor | None = None,
    scale: Tensor | None = None,
    buffer: Tensor | None = None,
) -> Tensor | None:
    """The gradient reaching ``x`` through its group and batch moments, plus ``d_out * scale[g]`` if given.

    Every moment is a mean over a group (or the batch) of ``x`` or of ``(x - mean)^2``, so the gradient is
    ``x * slope[g] + offset[g]`` with ``(G, C)`` tables: gathers and fused multiply-adds over the batch.
    ``buffer`` is a spent ``(N, C)`` temporary to write the result into (2D inputs only).
    """
    total = x.shape[0] * values_per_sample(x)
    slope = offset = None  # d x = x * slope[g] + offset[g]
    if d_var is not None:
        slope = d_var * inverse_counts
        slope.mul_(2.0)
        offset = torch.mul(slope, mean).neg_()
    if d_mean is not None:
        offset = d_mean * inverse_counts if offset is None else offset.addcmul_(d_mean, inverse_counts)
    batch_slope = batch_offset = None
    if d_batch_var is not None:
        batch_slope = d_batch_var * (2.0 / total)
    if d_batch_mean is not None:
        batch_offset = d_batch_mean * (1.0 / total)
    if batch_slope is not None:
        batch_offset = torch.mul(batch_slope, batch_mean).neg_() if batch_offset is None else (
            batch_offset.addcmul_(batch_slope, batch_mean, value=-1))
        slope = batch_slope.expand_as(mean).contiguous() if slope is None else slope.add_(batch_slope)
    if batch_offset is not None:
        offset = batch_offset.expand_as(mean).contiguous() if offset is None else offset.add_(batch_offset)
    if offset is None and d_out is None:
        return None
    if x.dim() == 2:
        terms = [(slope, x)] if slope is not None else []
        if d_out is not None:
            terms.append((scale, d_out))
        block = _block_rows(x)
        if block >= x.shape[0] and len(terms) + (offset is not None) > 1:
            # Unblocked, the sum needs a gathered table beside the output: in two halves it is half a batch.
            block = (x.shape[0] + 1) // 2
        return _rowwise_combine(x, groups, terms, offset, block, out=buffer)
    grad = None
    if offset is not None:
        grad = broadcast_rows(gather_rows(offset, groups), x)
        if slope is None:
            grad = grad.expand_as(x).clone(memory_format=torch.contiguous_format)
        else:
            grad = torch.addcmul(grad, x, broadcast_rows(gather_rows(slope, groups), x))
    if d_out is not None:
        scaled = broadcast_rows(gather_rows(scale, groups), x)
        grad = d_out * scaled if grad is None else grad.addcmul_(d_out, scaled)
    return grad


class _GroupMomentsFunction(torch.autograd.Function):
    """:func:`_moments_forward` with a hand-written backward (:func:`_moments_input_grad`)."""

    @staticmethod
    def forward(ctx, x: Tensor, segments: _Segments, counts: Tensor):  # noqa: ANN205
        inverse_counts = _inverse_counts(counts)
        block = _block_rows(x) if x.dim() == 2 else None
        mean, var, batch_mean, batch_var, _, _ = _moments_forward(x, segments, counts, inverse_counts, block)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, segments.groups, mean, batch_mean)
        ctx.inverse_counts = inverse_counts
        return mean, var, batch_mean, batch_var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_mean, d_var, d_batch_mean, d_batch_var):  # noqa: ANN205
        if not ctx.needs_input_grad[0]:
            return None, None, None
        x, groups, mean, batch_mean = ctx.saved_tensors
        d_x = _moments_input_grad(x, groups, ctx.inverse_counts, mean, batch_mean, d_mean, d_var, d_batch_mean,
                                  d_batch_var)
        return d_x, None, None


def group_moments(
    x: Tensor, groups: Tensor, num_groups: int, *, counts: Tensor | None = None, segments: _Segments | None = None
) -> GroupMoments:
    """Per-group, per-channel mean and biased variance from segment reductions.

    Two passes (mean, then the centred second moment) keep the variance accurate when the mean is large
    relative to the spread. Each pass is one segment sum over the batch, so the cost does not grow with
    the number of groups. Groups absent from the batch get count 0 and statistics 0. The gradient with
    respect to ``x`` is computed in one fused pass (see :func:`_moments_input_grad`); it is not itself
    differentiable (no double backward). ``counts`` (:func:`group_counts`) may be passed if already known.
    """
    if segments is None:
        known_counts, segments = counts_and_segments(groups, num_groups, values_per_sample(x), x.dtype)
        counts = known_counts if counts is None else counts
    elif counts is None:
        counts = group_counts(groups, num_groups, values_per_sample(x), x.dtype)
    if _needs_graph(x):
        mean, var, batch_mean, batch_var = _GroupMomentsFunction.apply(x, segments, counts)
    else:
        block = _block_rows(x) if x.dim() == 2 else None
        mean, var, batch_mean, batch_var, _, _ = _moments_forward(x, segments, counts, _inverse_counts(counts), block)
    return GroupMoments(counts, mean, var, batch_mean, batch_var)


# ------------------------------------------------------------------------------------------ the one map


def _group_affine_forward(
    x: Tensor, groups: Tensor, scale: Tensor, shift: Tensor | None, out: Tensor | None = None,
    spare: Tensor | None = None,
) -> Tensor:
    """``x * scale[g] + shift[g]`` (``shift=None``: no shift), into the spent 2D buffers ``out``/``spare`` if given."""
    if x.dim() == 2:
        return _rowwise_combine(x, groups, [(scale, x)], shift, _block_rows(x), out=out, spare=spare)
    scaled = broadcast_rows(gather_rows(scale, groups), x)
    return x * scaled if shift is None else torch.addcmul(broadcast_rows(gather_rows(shift, groups), x), x, scaled)


class _GroupAffineFunction(torch.autograd.Function):
    """``x * scale[g] + shift[g]`` with ``(G, C)`` tables; the table gradients are segment sums."""

    @staticmethod
    def forward(ctx, x: Tensor, segments: _Segments, scale: Tensor, shift: Tensor) -> Tensor:  # noqa: ANN205
        ctx.save_for_backward(x, segments.groups, scale)
        ctx.segments = segments
        return _group_affine_forward(x, segments.groups, scale, shift)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out: Tensor):  # noqa: ANN205
        x, groups, scale = ctx.saved_tensors
        d_scale = d_shift = d_x = buffer = None
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            block = _block_rows(x) if x.dim() == 2 else None
            d_scale, d_shift, buffer = _table_grads(x, ctx.segments, d_out, ctx.needs_input_grad[2], block)
        if ctx.needs_input_grad[0]:
            d_x = _group_affine_forward(d_out, groups, scale, None, out=buffer)
        return d_x, None, d_scale, d_shift


def group_affine(
    x: Tensor, groups: Tensor, scale: Tensor, shift: Tensor, *, segments: _Segments | None = None
) -> Tensor:
    """``x * scale[groups] + shift[groups]`` per channel, for ``(G, C)`` tables and ``(N, C, *)`` input."""
    if _needs_graph(x, scale, shift):
        if segments is None:
            segments = _segments(groups, scale.shape[0])
        return _GroupAffineFunction.apply(x, segments, scale, shift)
    return _group_affine_forward(x, groups, scale, shift)


def mix_with_moments(
    x: Tensor,
    segments: _Segments,
    mixing: Tensor,
    moments: GroupMoments,
    *,
    eps: float,
    output_scale: OutputScale,
    weight: Tensor | None,
    bias: Tensor | None,
) -> Tensor:
    """The layer from given moments: the ``(G, C)`` arithmetic in ordinary autograd, the batch-sized map
    through :func:`group_affine` (whose backward is fused)."""
    table_mean, table_std = statistics_table(moments, eps)
    factor, offset = output_map(weight, bias, batch_reference(moments, eps) if output_scale == "batch" else None)
    if mixing.dim() == 1:  # one mixture: every member of a group gets the same map
        mixed_mean, mixed_std = mixing @ table_mean, mixing @ table_std
        scale, shift, _ = normalization_map(table_mean, table_std, mixed_mean, mixed_std, factor, offset)
        return group_affine(x, segments.groups, scale, shift, segments=segments)
    # One mixture per sample: y = mixed_std[n] * z + level[n], where z = (x - mean[g]) * factor / std[g] is the
    # map without a mixture (one per group) and level[n] = mixed_mean[n] * factor + offset. The factor goes on
    # the (G, C) table before mixing (the map is linear), so the batch-sized level is one matrix product.
    scale, shift, _ = normalization_map(table_mean, table_std, None, None, factor)
    standardized = group_affine(x, segments.groups, scale, shift, segments=segments)
    means = apply_affine(table_mean, factor, None)
    level = mixing @ means if offset is None else torch.addmm(offset, mixing, means)
    return apply_affine(standardized, mixing @ table_std, level)


# ----------------------------------------------------------------------------- the shared-mixture layer


class BatchStatistics(NamedTuple):
    """What the running statistics need from one training batch (no gradient)."""

    moments: GroupMoments
    mixed_mean: Tensor
    mixed_std: Tensor


def batch_statistics(counts: Tensor, stats: Tensor) -> BatchStatistics:
    """:class:`BatchStatistics` from the compiled kernels' ``(2G + 4, C)`` table (:func:`._fused_cpu.forward`)."""
    mean, var, (batch_mean, batch_var, mixed_mean, mixed_std) = stats.split([counts.shape[0], counts.shape[0], 4])
    return BatchStatistics(GroupMoments(counts, mean, var, batch_mean, batch_var), mixed_mean, mixed_std)


class _SharedMixFunction(torch.autograd.Function):
    """The whole training-time layer with one mixture shared by the batch, forward and backward by hand.

    Forward: group moments, the statistics table, the mixed statistics, and the per-group map
    ``y = x * scale[g] + shift[g]`` (batch reference and affine folded in). Returns ``y``, and the
    moments too (differentiable) when ``with_moments``, for penalties on them. The batch's statistics are
    appended to ``sink`` (a list, or ``None``) for the running statistics.

    Backward: ``sum_g dy * x`` and ``sum_g dy`` (two segment sums), the chain rule through the ``(G, C)``
    arithmetic written out, and ``dx = dy * scale[g] + x * slope[g] + offset[g]`` in fused passes. A 2D
    input needs one batch-sized temporary besides the output in each direction.
    """

    @staticmethod
    def forward(ctx, x, segments, counts, mixing, weight, bias, eps, in_batch_units, all_eligible, with_moments, sink):  # noqa: ANN205, E501
        groups = segments.groups
        block = _block_rows(x) if x.dim() == 2 else None
        inverse_counts = _inverse_counts(counts)
        mean, var, batch_mean, batch_var, centred, spare = _moments_forward(x, segments, counts, inverse_counts, block)
        moments = GroupMoments(counts, mean, var, batch_mean, batch_var)
        table_mean, table_std = statistics_table(moments, eps, all_eligible=all_eligible)
        mixed_mean, mixed_std = torch.mv(table_mean.t(), mixing), torch.mv(table_std.t(), mixing)
        reference = batch_reference(moments, eps) if in_batch_units else None
        batch_std = None if reference is None else reference[1]
        factor, offset = output_map(weight, bias, reference)
        scale, shift, level = normalization_map(table_mean, table_std, mixed_mean, mixed_std, factor, offset)
        if centred is not None and all_eligible:
            # x - mean[g] is already in a buffer: finish the output in it.
            out = torch.addcmul(level, centred, torch.index_select(scale, 0, groups, out=spare), out=centred)
        else:
            out = _group_affine_forward(x, groups, scale, shift, out=centred, spare=spare)
        del centred, spare
        if sink is not None:
            sink.append(BatchStatistics(moments, mixed_mean, mixed_std))
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, groups, counts, mixing, weight, mean, batch_mean)
        # Intermediates (neither inputs nor outputs) may live on the context directly.
        ctx.inverse_counts, ctx.table_std, ctx.scale, ctx.factor, ctx.batch_std = (
            inverse_counts, table_std, scale, factor, batch_std)
        ctx.mixed_mean, ctx.mixed_std, ctx.segments, ctx.all_eligible = mixed_mean, mixed_std, segments, all_eligible
        ctx.block = block
        ctx.table_mean = None if table_mean is mean else table_mean
        if with_moments:
            return out, mean, var, batch_mean, batch_var
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_mean=None, d_var=None, d_batch_mean=None, d_batch_var=None):  # noqa: ANN205
        x, groups, counts, mixing, weight, mean, batch_mean = ctx.saved_tensors
        d_mixing = d_weight = d_bias = buffer = None
        if d_out is not None:
            d_scale, d_shift, buffer = _table_grads(x, ctx.segments, d_out, block=ctx.block)
            d_mixing, d_weight, d_bias, *through = _shared_mix_table_backward(ctx, d_scale, d_shift, mixing, counts,
                                                                              mean, batch_mean)
            del d_scale, d_shift  # the (G, C) tables that are spent: they need not live through the batch pass
            d_mean, d_var, d_batch_mean, d_batch_var = (
                _sum_or_none(*pair) for pair in zip(through, (d_mean, d_var, d_batch_mean, d_batch_var)))
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = _moments_input_grad(x, groups, ctx.inverse_counts, mean, batch_mean, d_mean, d_var, d_batch_mean,
                                      d_batch_var, d_out=d_out, scale=ctx.scale, buffer=buffer)
        return d_x, None, None, d_mixing, d_weight, d_bias, None, None, None, None, None


def _shared_mix_table_backward(
    ctx: Any, d_scale: Tensor, d_shift: Tensor, mixing: Tensor, counts: Tensor, mean: Tensor, batch_mean: Tensor
) -> tuple[Tensor | None, ...]:
    """The chain rule of :class:`_SharedMixFunction` through its ``(G, C)`` arithmetic, from the segment sums
    ``d_scale = sum_g dy * x`` and ``d_shift = sum_g dy``: the gradients of the mixture, weight and bias,
    then those reaching the group means and variances and the batch's mean and variance."""
    table_mean = mean if ctx.table_mean is None else ctx.table_mean
    table_std, scale, factor, batch_std = ctx.table_std, ctx.scale, ctx.factor, ctx.batch_std
    needs_mixing, needs_weight, needs_bias = ctx.needs_input_grad[3:6]
    d_mixing = d_weight = d_bias = None
    # y = scale_g * (x - m_g) + level, level = mu_mix * factor + offset, scale_g = sigma_mix * factor / s_g.
    standardized = torch.addcmul(d_scale, table_mean, d_shift, value=-1).div_(table_std)  # sum_g dy (x-m)/s
    d_level = d_shift.sum(dim=0)
    d_spread = standardized.sum(dim=0)  # d / d(sigma_mix * factor)
    d_mixed_mean = d_level if factor is None else d_level * factor
    d_mixed_std = d_spread if factor is None else d_spread * factor
    # Table rows: directly (each group's own normalization) and through the mixture.
    d_table_mean = torch.outer(mixing, d_mixed_mean).addcmul_(scale, d_shift, value=-1)
    d_table_var = torch.outer(mixing, d_mixed_std).addcmul_(standardized, scale, value=-1)
    if needs_mixing:
        d_mixing = torch.addmv(torch.mv(table_mean, d_mixed_mean), table_std, d_mixed_std)
    d_table_var.div_(table_std).mul_(0.5)  # through s = sqrt(var + eps)
    extra_batch_mean = extra_batch_var = None
    if factor is not None and (batch_std is not None or needs_weight):
        d_factor = torch.mul(ctx.mixed_std, d_spread).addcmul_(ctx.mixed_mean, d_level)
        if batch_std is not None:
            # factor = w / sigma_B, offset = b - mu_B * factor, sigma_B = sqrt(var_B + eps).
            d_factor.addcmul_(batch_mean, d_level, value=-1).div_(batch_std)  # now the gradient of w
            extra_batch_mean = torch.mul(factor, d_level).neg_()
            extra_batch_var = torch.mul(d_factor, factor).div_(batch_std).mul_(-0.5)
        if needs_weight:
            d_weight = d_factor
    if needs_bias:
        d_bias = d_level
    fallback_mean = fallback_var = None
    if not ctx.all_eligible:
        # A group without its own statistics has the batch's in its row.
        usable = eligible_groups(counts)
        fallback_mean, fallback_var = d_table_mean[~usable].sum(dim=0), d_table_var[~usable].sum(dim=0)
        usable = usable.unsqueeze(1).to(mean.dtype)
        d_table_mean.mul_(usable)
        d_table_var.mul_(usable)
    d_batch_mean = _sum_or_none(fallback_mean, extra_batch_mean)
    d_batch_var = _sum_or_none(fallback_var, extra_batch_var)
    return d_mixing, d_weight, d_bias, d_table_mean, d_table_var, d_batch_mean, d_batch_var


class _NoContext:
    """Stands in for the autograd context when :class:`_SharedMixFunction` runs without a graph."""

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass


def shared_mix_norm(
    x: Tensor,
    segments: _Segments,
    counts: Tensor,
    mixing: Tensor,
    eps: float,
    output_scale: OutputScale,
    weight: Tensor | None,
    bias: Tensor | None,
    all_eligible: bool | None = None,
    *,
    with_moments: bool = False,
) -> tuple[Tensor, GroupMoments | None, BatchStatistics]:
    """The layer with one shared mixture, computing its own moments (one fused autograd function): the
    compiled CPU kernels where :func:`._fused_cpu.applies` says so, else :class:`_SharedMixFunction`.

    Returns the output, the differentiable moments if ``with_moments`` (else ``None``), and the batch's
    statistics for the running averages.
    """
    if _fused_cpu.applies(x, segments.groups, weight, bias, mixing=mixing):
        step = _fused_cpu.shared_mix_norm(x, segments.groups, mixing, weight, bias, eps, output_scale == "batch",
                                          with_moments=with_moments)
        moments = None if step.moments is None else GroupMoments(counts, *step.moments)
        return step.out, moments, batch_statistics(counts, torch.from_numpy(step.stats))
    if all_eligible is None:
        all_eligible = every_group_eligible(counts)
    sink: list[BatchStatistics] = []
    args = (x, segments, counts, mixing, weight, bias, eps, output_scale == "batch", all_eligible, with_moments, sink)
    if _needs_graph(x, mixing, weight, bias):
        result = _SharedMixFunction.apply(*args)
    else:
        with torch.no_grad():
            result = _SharedMixFunction.forward(_NoContext(), *args)
    if with_moments:
        out, *stats = result
        return out, GroupMoments(counts, *stats), sink[0]
    return result, None, sink[0]
