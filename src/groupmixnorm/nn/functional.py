"""Functional core of GroupMixNorm: group moments, mixing weights and the normalization itself.

Everything here is stateless and differentiable. The modules in :mod:`groupmixnorm.nn.modules` own the
running statistics and the random draws; the functions below do the arithmetic, so they can be tested
(``gradcheck``) and reused (a synchronized variant only has to replace :func:`group_moments`).

Shapes: ``x`` is ``(N, C, *)`` (channels second, any number of trailing spatial axes, as in
``torch.nn.BatchNorm*``), ``groups`` is ``(N,)`` with integer ids in ``[0, G)``.
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


def _values_per_sample(x: Tensor) -> int:
    """How many values each sample contributes to a channel: the product of the spatial sizes."""
    return math.prod(x.shape[2:])


def _per_sample_channel_sums(x: Tensor) -> Tensor:
    """Sum over the spatial axes: ``(N, C, *) -> (N, C)``."""
    return x.flatten(2).sum(dim=2) if x.dim() > 2 else x


def _broadcast_rows(stat: Tensor, x: Tensor) -> Tensor:
    """Reshape per-sample ``(N, C)`` statistics so they broadcast against ``(N, C, *)``."""
    return stat.reshape(stat.shape + (1,) * (x.dim() - 2)) if x.dim() > 2 else stat


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
        rows = _per_sample_channel_sums(values)
        if rows.numel() < _EMBEDDING_BAG_ABOVE or rows.device.type != "cpu":
            return rows.new_zeros(self.num_groups, rows.shape[1]).index_add_(0, self.groups, rows)
        if self._order is None:
            self._order = torch.argsort(self.groups, stable=True)
            self._starts = self.samples_per_group.cumsum(0).sub_(self.samples_per_group)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return torch.nn.functional.embedding_bag(self._order, rows, self._starts, mode="sum")


_EMBEDDING_BAG_ABOVE = 1 << 16


def _segments(groups: Tensor, num_groups: int) -> _Segments:
    return _Segments(groups, _bincount(groups, num_groups))


def _bincount(groups: Tensor, num_groups: int) -> Tensor:
    counts = torch.bincount(groups, minlength=num_groups)
    if counts.shape[0] != num_groups:
        raise IndexError(f"group id {counts.shape[0] - 1} is out of range for a table of {num_groups} groups")
    return counts


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


# The batch-sized passes over a large 2D input run over blocks of rows, so that the gathered per-group
# tables and other temporaries of a block stay in the CPU cache instead of making a round trip through
# memory; each pass then costs little more than reading its inputs and writing its output.
_BLOCK_ELEMENTS = 1 << 17
_BLOCKED_ABOVE = 1 << 19


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


def group_counts(
    groups: Tensor, num_groups: int, values_per_sample: int = 1, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Number of values per channel in each group, ``(G,)``: samples per group times ``values_per_sample``."""
    return _counts_and_segments(groups, num_groups, values_per_sample, dtype)[0]


def _counts_and_segments(
    groups: Tensor, num_groups: int, values_per_sample: int, dtype: torch.dtype
) -> tuple[Tensor, _Segments]:
    samples = _bincount(groups, num_groups)
    counts = samples.to(dtype)
    if values_per_sample != 1:
        counts = counts * values_per_sample
    return counts, _Segments(groups, samples)


def _all_eligible(counts: Tensor) -> bool:
    """Whether every group of the table has its own statistics (the common case, with cheaper arithmetic)."""
    return bool(counts.min() >= MIN_VALUES_PER_GROUP) if counts.numel() else True


def _inverse_counts(counts: Tensor) -> Tensor:
    """``1 / max(count, 1)`` as a ``(G, 1)`` column."""
    return counts.clamp_min(1).reciprocal_().unsqueeze_(1)


def _moments_forward(
    x: Tensor, segments: _Segments, counts: Tensor, inverse_counts: Tensor, block: int | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """Group means and biased variances, the batch's mean and variance, and two ``(N, C)`` temporaries.

    Two passes (mean, then the centred second moment) keep the variance accurate when the mean is large
    relative to the spread. The batch statistics follow from the group ones (law of total variance).
    For a 2D input the temporaries are ``x - mean[g]`` and a spent buffer, which the caller may reuse;
    otherwise both are ``None``.
    """
    mean = segments.sum(x).mul_(inverse_counts)
    centred = spare = None
    if x.dim() > 2:
        var = segments.sum((x - _broadcast_rows(gather_rows(mean, segments.groups), x)).square_())
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
    shares = counts / (x.shape[0] * _values_per_sample(x))
    batch_mean = torch.mv(mean.t(), shares)
    batch_var = torch.mv((mean - batch_mean).square_().add_(var).t(), shares)
    return mean, var, batch_mean, batch_var, centred, spare


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
    total = x.shape[0] * _values_per_sample(x)
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
        return _rowwise_combine(x, groups, terms, offset, _block_rows(x), out=buffer)
    grad = None
    if offset is not None:
        grad = _broadcast_rows(gather_rows(offset, groups), x)
        if slope is None:
            grad = grad.expand_as(x).clone(memory_format=torch.contiguous_format)
        else:
            grad = torch.addcmul(grad, x, _broadcast_rows(gather_rows(slope, groups), x))
    if d_out is not None:
        scaled = _broadcast_rows(gather_rows(scale, groups), x)
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
        d_x = _moments_input_grad(x, groups, ctx.inverse_counts, mean, batch_mean, d_mean, d_var, d_batch_mean, d_batch_var)
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
        known_counts, segments = _counts_and_segments(groups, num_groups, _values_per_sample(x), x.dtype)
        counts = known_counts if counts is None else counts
    elif counts is None:
        counts = group_counts(groups, num_groups, _values_per_sample(x), x.dtype)
    if _needs_graph(x):
        mean, var, batch_mean, batch_var = _GroupMomentsFunction.apply(x, segments, counts)
    else:
        block = _block_rows(x) if x.dim() == 2 else None
        mean, var, batch_mean, batch_var, _, _ = _moments_forward(x, segments, counts, _inverse_counts(counts), block)
    return GroupMoments(counts, mean, var, batch_mean, batch_var)


def _group_affine_forward(x: Tensor, groups: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``x * scale[g] + shift[g]``."""
    if x.dim() == 2:
        return _rowwise_combine(x, groups, [(scale, x)], shift, _block_rows(x))
    return torch.addcmul(_broadcast_rows(gather_rows(shift, groups), x), x, _broadcast_rows(gather_rows(scale, groups), x))


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
            if x.dim() == 2:
                d_x = _rowwise_combine(x, groups, [(scale, d_out)], None, _block_rows(x), out=buffer)
            else:
                d_x = d_out * _broadcast_rows(gather_rows(scale, groups), x)
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


def _output_map(
    batch_mean: Tensor, batch_var: Tensor, eps: float, output_scale: OutputScale, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The per-channel map ``u -> u * factor + offset`` applied after mixing, ``(C,)`` each or ``None``.

    It folds the batch reference of ``output_scale="batch"``, ``(u - mu_B) / sigma_B``, and the affine.
    Also returns ``sigma_B`` (``None`` for ``"mixed"``).
    """
    if output_scale != "batch":
        return weight, bias, None
    batch_std = (batch_var + eps).sqrt_()
    factor = batch_std.reciprocal() if weight is None else weight / batch_std
    offset = torch.mul(batch_mean, factor).neg_() if bias is None else torch.addcmul(bias, batch_mean, factor, value=-1)
    return factor, offset, batch_std


class _BatchStatistics(NamedTuple):
    """What the running statistics need from one training batch (no gradient)."""

    moments: GroupMoments
    mixed_mean: Tensor
    mixed_std: Tensor


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
    def forward(ctx, x, segments, counts, mixing, weight, bias, eps, batch_reference, all_eligible, with_moments, sink):  # noqa: ANN205
        groups = segments.groups
        block = _block_rows(x) if x.dim() == 2 else None
        inverse_counts = _inverse_counts(counts)
        mean, var, batch_mean, batch_var, centred, spare = _moments_forward(x, segments, counts, inverse_counts, block)
        if all_eligible:
            table_mean, table_var = mean, var
        else:
            usable = eligible_groups(counts).unsqueeze(1)
            table_mean, table_var = torch.where(usable, mean, batch_mean), torch.where(usable, var, batch_var)
        table_std = (table_var + eps).sqrt_()
        mixed_mean, mixed_std = torch.mv(table_mean.t(), mixing), torch.mv(table_std.t(), mixing)
        factor, offset, batch_std = _output_map(
            batch_mean, batch_var, eps, "batch" if batch_reference else "mixed", weight, bias
        )
        # y = level + scale[g] * (x - mean[g]), level = mu_mix * factor + offset, scale = sigma_mix * factor / s.
        if factor is None:
            level = mixed_mean if offset is None else mixed_mean + offset
            scale = mixed_std / table_std
        else:
            level = mixed_mean * factor if offset is None else torch.addcmul(offset, mixed_mean, factor)
            scale = torch.div(mixed_std * factor, table_std)
        if centred is not None and all_eligible:
            # x - mean[g] is already in a buffer: finish the output in it.
            out = torch.addcmul(level, centred, torch.index_select(scale, 0, groups, out=spare), out=centred)
        else:
            shift = torch.addcmul(level, table_mean, scale, value=-1)
            if x.dim() == 2:
                out = _rowwise_combine(x, groups, [(scale, x)], shift, block or max(x.shape[0], 1), out=centred,
                                       spare=spare)
            else:
                out = _group_affine_forward(x, groups, scale, shift)
        del centred, spare
        if sink is not None:
            sink.append(_BatchStatistics(GroupMoments(counts, mean, var, batch_mean, batch_var), mixed_mean, mixed_std))
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
    def backward(ctx, d_out, d_mean=None, d_var=None, d_batch_mean=None, d_batch_var=None):  # noqa: ANN205, C901
        x, groups, counts, mixing, weight, mean, batch_mean = ctx.saved_tensors
        table_mean = mean if ctx.table_mean is None else ctx.table_mean
        table_std, scale, factor, batch_std = ctx.table_std, ctx.scale, ctx.factor, ctx.batch_std
        needs_x, _, _, needs_mixing, needs_weight, needs_bias = ctx.needs_input_grad[:6]
        d_mixing = d_weight = d_bias = buffer = None
        if d_out is not None:
            d_scale, d_shift, buffer = _table_grads(x, ctx.segments, d_out, block=ctx.block)
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
                usable = eligible_groups(counts).unsqueeze(1).to(x.dtype)
                own_mean, own_var = d_table_mean * usable, d_table_var * usable
                fallback_mean = (d_table_mean - own_mean).sum(dim=0)
                fallback_var = (d_table_var - own_var).sum(dim=0)
                d_table_mean, d_table_var = own_mean, own_var
            d_mean = _sum_or_none(d_table_mean, d_mean)
            d_var = _sum_or_none(d_table_var, d_var)
            d_batch_mean = _sum_or_none(fallback_mean, extra_batch_mean, d_batch_mean)
            d_batch_var = _sum_or_none(fallback_var, extra_batch_var, d_batch_var)
        d_x = None
        if needs_x:
            d_x = _moments_input_grad(x, groups, ctx.inverse_counts, mean, batch_mean, d_mean, d_var, d_batch_mean,
                                      d_batch_var, d_out=d_out, scale=scale, buffer=buffer)
        return d_x, None, None, d_mixing, d_weight, d_bias, None, None, None, None, None


def _shared_mix_norm(
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
    sink: list | None = None,
) -> tuple[Tensor, GroupMoments | None]:
    """The layer with one shared mixture, computing its own moments (one fused autograd function).

    Returns the output and, if ``with_moments``, the differentiable moments (else ``None``); the batch's
    statistics for the running averages are appended to ``sink`` if given.
    """
    if all_eligible is None:
        all_eligible = _all_eligible(counts)
    args = (x, segments, counts, mixing, weight, bias, eps, output_scale == "batch", all_eligible, with_moments, sink)
    if _needs_graph(x, mixing, weight, bias):
        result = _SharedMixFunction.apply(*args)
    else:
        with torch.no_grad():
            result = _SharedMixFunction.forward(_NoContext(), *args)
    if with_moments:
        out, *stats = result
        return out, GroupMoments(counts, *stats)
    return result, None


class _NoContext:
    """Stands in for the autograd context when :class:`_SharedMixFunction` runs without a graph."""

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass


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

    This is the layer's math written plainly, in ordinary autograd: it supports double backward and
    ``torch.compile``. The layers use a fused equivalent (:func:`fused_group_mix_norm`, tested against this
    one) for speed, and this one inside :func:`~groupmixnorm.nn.use_reference` and compiled graphs.

    With ``mu_g, sigma_g`` the statistics of sample n's group (:func:`plain_group_moments`, with the
    batch's in place of a group's that has fewer than two values per channel) and
    ``mu_mix = sum_g w_g mu_g``, ``sigma_mix = sum_g w_g sigma_g``::

        y = sigma_mix * (x - mu_g) / sigma_g + mu_mix                       (output_scale="mixed")
        y = (sigma_mix * (x - mu_g) / sigma_g + mu_mix - mu_B) / sigma_B    (output_scale="batch")

    then ``y * weight + bias``.

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
    """:func:`group_moments` in ordinary autograd (two passes: the mean, then the centred second moment)."""
    counts = torch.bincount(groups, minlength=num_groups).to(x.dtype) * _values_per_sample(x)
    per_count = counts.clamp_min(1).unsqueeze(1)
    mean = x.new_zeros(num_groups, x.shape[1]).index_add(0, groups, _per_sample_channel_sums(x)) / per_count
    centred = (x - _broadcast_rows(mean[groups], x)).square()
    var = x.new_zeros(num_groups, x.shape[1]).index_add(0, groups, _per_sample_channel_sums(centred)) / per_count
    shares = counts / counts.sum()
    batch_mean = shares @ mean
    batch_var = shares @ ((mean - batch_mean).square() + var)
    return GroupMoments(counts, mean, var, batch_mean, batch_var)


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
    mixed_mean, mixed_std = mixing @ table_mean, mixing @ table_std
    if mixing.dim() == 1:
        mixed_mean, mixed_std = mixed_mean.unsqueeze(0), mixed_std.unsqueeze(0)
    own_mean, own_std = _broadcast_rows(table_mean[groups], x), _broadcast_rows(table_std[groups], x)
    y = _broadcast_rows(mixed_std.expand(x.shape[0], -1), x) * (x - own_mean) / own_std
    y = y + _broadcast_rows(mixed_mean.expand(x.shape[0], -1), x)
    if output_scale == "batch":
        reference_mean = _broadcast_rows(moments.batch_mean.unsqueeze(0), x)
        y = (y - reference_mean) / _broadcast_rows(torch.sqrt(moments.batch_var + eps).unsqueeze(0), x)
    return apply_affine(y, weight, bias)


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
    several times faster on small batches, first derivatives only. Precomputed :func:`group_moments` of
    ``x`` may be passed; without them a shared mixture runs as one fused function that computes them."""
    counts, segments = _counts_and_segments(groups, num_groups, _values_per_sample(x), x.dtype)
    if moments is None and mixing.dim() == 1:
        return _shared_mix_norm(x, segments, counts, mixing, eps, output_scale, weight, bias)[0]
    if moments is None:
        moments = group_moments(x, groups, num_groups, counts=counts, segments=segments)
    return _group_mix_norm(x, groups, mixing, moments, eps, output_scale, weight, bias, segments)[0]


def _group_mix_norm(
    x: Tensor,
    groups: Tensor,
    mixing: Tensor,
    moments: GroupMoments,
    eps: float,
    output_scale: OutputScale,
    weight: Tensor | None,
    bias: Tensor | None,
    segments: _Segments | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`group_mix_norm` from given moments, also returning the statistics table ``(mean, std)``.

    The layer is ``x * scale + shift`` with a scale and shift per group (shared mixing) or per sample
    (per-sample mixing) that are small functions of the group moments. The batch-sized work goes through
    two custom autograd functions (the moments and the per-group affine map) with fused backward passes;
    the ``(G, C)`` arithmetic in between is ordinary autograd.
    """
    table_mean, table_std = statistics_table(moments, eps)
    factor, offset, _ = _output_map(moments.batch_mean, moments.batch_var, eps, output_scale, weight, bias)
    if mixing.dim() == 1:
        # One mixture: every member of a group gets the same affine map.
        mixed_mean, mixed_std = mixing @ table_mean, mixing @ table_std
        if factor is not None:
            mixed_std = mixed_std * factor
            mixed_mean = mixed_mean * factor if offset is None else torch.addcmul(offset, mixed_mean, factor)
        elif offset is not None:
            mixed_mean = mixed_mean + offset
        group_scale = mixed_std / table_std
        group_shift = torch.addcmul(mixed_mean, table_mean, group_scale, value=-1)
        return group_affine(x, groups, group_scale, group_shift, segments=segments), table_mean, table_std
    # One mixture per sample: y = sigma_mix[n] * z + mu_mix[n], with z = (x - mu_g) / sigma_g (times the
    # output factor) a per-group affine map, and the mixed statistics one matrix product each.
    inverse_std = 1.0 / table_std if factor is None else factor / table_std
    standardized = group_affine(x, groups, inverse_std, -table_mean * inverse_std, segments=segments)
    mixed_std = mixing @ table_std
    means = table_mean if factor is None else table_mean * factor
    mixed_mean = mixing @ means if offset is None else torch.addmm(offset, mixing, means)
    out = torch.addcmul(_broadcast_rows(mixed_mean, x), _broadcast_rows(mixed_std, x), standardized)
    return out, table_mean, table_std


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
    factor, offset, _ = _output_map(moments.batch_mean, moments.batch_var, eps, "batch", weight, bias)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return torch.addcmul(offset.reshape(shape), x, factor.reshape(shape))


def apply_affine(y: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    shape = (1, -1) + (1,) * (y.dim() - 2)
    if weight is not None:
        y = y * weight.reshape(shape)
    if bias is not None:
        y = y + bias.reshape(shape)
    return y


def shared_mixing_weights(counts: Tensor, alpha: float, *, all_eligible: bool | None = None) -> Tensor:
    """One Dirichlet(alpha) draw over the groups eligible in this batch, ``(G,)``.

    Absent groups and groups too small for their own statistics get weight zero. If no group is eligible,
    every present group gets equal weight (their table rows are then all the batch statistics anyway).
    Draws come from torch's global generator, so ``torch.manual_seed`` makes them repeatable.
    ``all_eligible`` may say, if already known, whether every group is eligible.
    """
    concentration = torch.full(counts.shape, float(alpha), dtype=counts.dtype, device=counts.device)
    # What Gamma(concentration, 1).sample() computes, without building a distribution object per batch.
    draws = torch._standard_gamma(concentration).clamp_(min=torch.finfo(counts.dtype).tiny)
    if not all_eligible:
        eligible = eligible_groups(counts)
        if not bool(eligible.any()):
            eligible = counts > 0
        draws.mul_(eligible)
    return draws.div_(draws.sum())


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


def conditional_alignment_penalty(
    x: Tensor, groups: Tensor, num_groups: int, condition: Tensor, *, eps: float, covariance: bool = False,
    quantiles: int = 0,
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
            x[members], groups[members], moments, eps=eps, covariance=covariance, quantiles=quantiles
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
        picks, num_groups = _quantile_positions(values, groups, moments.counts, x[0, 0].numel(), levels)
    picked = values.gather(1, picks)
    group_quantiles = picked[:, : num_groups * levels].view(values.shape[0], num_groups, levels)
    batch_quantiles = picked[:, num_groups * levels :].unsqueeze(1)  # (C, 1, levels)
    batch_std = torch.sqrt(moments.batch_var + eps).view(-1, 1, 1)
    distance = ((group_quantiles - batch_quantiles) / batch_std).pow(2).mean(dim=(0, 2))  # (G,)
    usable = eligible_groups(moments.counts)
    shares = (moments.counts * usable) / (moments.counts * usable).sum().clamp_min(1)
    return (shares * distance).sum()


def _quantile_positions(
    values: Tensor, groups: Tensor, counts: Tensor, values_per_sample: int, levels: int
) -> tuple[Tensor, int]:
    """Column indices into ``values`` (C, M) of every group's quantiles, then the batch's: (C, (G + 1) * levels)."""
    value_groups = groups.repeat_interleave(values_per_sample) if values_per_sample > 1 else groups
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
