"""GroupMixNorm for multi-process training: group statistics of the whole distributed batch.

Under ``DistributedDataParallel`` each process sees a slice of the global batch, so a rare group may have
one or two samples per process, or none. :class:`SyncGroupMixNorm` computes every group's moments over
all processes, as ``torch.nn.SyncBatchNorm`` does for the batch moments: each process's per-group counts,
means and variances travel in one all-gather per layer call (not one per group), together with the mixing
draws, so every process normalizes with the same statistics and rank 0's mixture. The gather is part of the
autograd graph, so input gradients are those of one process holding the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from groupmixnorm.nn import _kernels as K
from groupmixnorm.nn import functional as F
from groupmixnorm.nn._core import GroupMoments, combined_moments, values_per_sample
from groupmixnorm.nn.modules import _GroupMixNorm

#: Constructor options of a GroupMixNorm layer, copied by :func:`convert_sync_groupmixnorm`.
_LAYER_OPTIONS = (
    "num_groups", "mix", "alpha", "p", "eps", "momentum", "affine", "track_running_stats", "output_scale",
    "eval_mode", "align_covariance", "align_quantiles", "align_projections",
)


class _AllGather(torch.autograd.Function):
    """Concatenate every process's rows (row counts may differ); the gradient of each process's slice is
    the sum over processes of the gradients of their copies."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group: Any, sizes: list[int] | None = None) -> Tensor:  # noqa: ANN205
        sizes = _row_counts(tensor, group) if sizes is None else sizes
        ctx.group, ctx.sizes, ctx.rank = group, sizes, dist.get_rank(group)
        return _gather_rows(tensor, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: ANN205
        total = grad.contiguous()
        dist.all_reduce(total, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return total[start : start + ctx.sizes[ctx.rank]], None, None


def _row_counts(tensor: Tensor, group: Any) -> list[int]:
    counts = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, torch.tensor(tensor.shape[0], device=tensor.device), group=group)
    return [int(count) for count in counts]


def _gather_rows(tensor: Tensor, sizes: list[int], group: Any) -> Tensor:
    """``all_gather`` of tensors whose first dimension differs between processes (padded, then trimmed)."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _gather_plain(tensor: Tensor, group: Any) -> Tensor:
    """Every process's rows of a tensor outside the graph (group ids, labels)."""
    return _gather_rows(tensor, _row_counts(tensor, group), group)


class SyncGroupMixNorm(_GroupMixNorm):
    """GroupMixNorm whose training statistics span every process of a process group.

    Takes ``(N, C, *)`` input (any number of spatial axes) and the options of :class:`GroupMixNorm1d`,
    plus ``process_group`` (default: the whole world). ``num_groups`` is required: every process must
    agree on the size of the statistics table even when some groups are missing locally.

    In training, inside an initialized process group of more than one process, the layer gives each
    process the slice of the output that one ``GroupMixNorm`` layer would give on the concatenated batch:
    the group moments are those of all processes, and the mixing weights (and, for ``p < 1``, the choice
    to mix) are rank 0's draws. Seed every process alike (``torch.manual_seed``) so that rank 0 draws what
    a single process with that seed would. Outside a process group it is an ordinary GroupMixNorm layer;
    in evaluation it always is (its running statistics are identical on every process).

    Only ``mix="shared"`` is supported: pairwise mixing draws a partner per sample. One all-gather carries
    every process's group counts, means and variances (two-pass on each process, combined by the law of
    total variance, so as precise as one layer's). The alignment penalty, when collected, is that of
    the whole distributed batch (its inputs are gathered: quantiles need every value); every process
    holds the same penalty, and DDP's averaged gradients are those of one penalty.

    Examples::

        >>> model = groupmixnorm.nn.convert_sync_groupmixnorm(model)   # before wrapping in DDP
        >>> model = torch.nn.parallel.DistributedDataParallel(model)
    """

    _expected_dims = (2, 3, 4, 5)

    def __init__(self, num_features: int, *, num_groups: int | None = None, process_group: Any = None, **options: Any) -> None:
        if num_groups is None:
            raise ValueError("SyncGroupMixNorm needs num_groups: every process must use the same statistics table")
        if options.get("mix", "shared") != "shared":
            raise ValueError("SyncGroupMixNorm supports mix='shared' only (pairwise mixing draws a partner per sample)")
        super().__init__(num_features, num_groups=num_groups, **options)
        self.process_group = process_group

    def _may_fuse(self) -> bool:
        # The fused function computes this process's moments; synchronized ones come from the all-gather.
        return not self._is_distributed() and super()._may_fuse()

    def _moments_and_mixing(
        self, x: Tensor, groups: Tensor, table_size: int, mix: bool
    ) -> tuple[GroupMoments, Tensor | None, K._Segments | None]:
        if not self._is_distributed():
            return super()._moments_and_mixing(x, groups, table_size, mix)
        mix, gamma, moments, segments = self._synchronized_moments(x, groups, table_size, mix)
        self._check_finite(moments, x)  # the moments are summed over all processes, so every one raises alike
        return moments, F.weights_from_gamma(gamma, moments.counts) if mix else None, segments

    def _stratified_step(self, x: Tensor, *args: Any) -> tuple[Tensor, GroupMoments]:
        if self._is_distributed():
            raise ValueError("SyncGroupMixNorm does not mix within strata (mix_within) across processes; "
                             "train without mix_within, or in one process")
        return super()._stratified_step(x, *args)

    def _alignment(
        self, x: Tensor, groups: Tensor, moments: GroupMoments, table_size: int, condition: Tensor | None
    ) -> Tensor:
        """The alignment penalty of the whole distributed batch, the same number on every process.

        The inputs are gathered (quantiles need every value, not only sums); the gather's backward sums
        the gradients of all processes' copies, so that DDP's average over processes gives the gradient of
        one penalty, as it does for the mean loss.
        """
        if not self._is_distributed():
            return super()._alignment(x, groups, moments, table_size, condition)
        everything = _AllGather.apply(x, self.process_group)
        all_groups = _gather_plain(groups, self.process_group)
        all_condition = None if condition is None else _gather_plain(condition.to(x.device), self.process_group)
        all_moments = F.group_moments(everything, all_groups, table_size)
        return super()._alignment(everything, all_groups, all_moments, table_size, all_condition)

    def _is_distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size(self.process_group) > 1

    def _synchronized_moments(
        self, x: Tensor, groups: Tensor, table_size: int, mix_here: bool
    ) -> tuple[bool, Tensor, GroupMoments, K._Segments]:
        """One all-gather of this process's per-group counts, means and variances, with its draws: whether
        to mix (rank 0's ``p`` draw), rank 0's Gamma draws, the moments of all processes, and this
        process's rows by group.

        Each process's moments are two-pass (as in every GroupMixNorm layer) and are combined by the law of
        total variance, so the variance stays accurate when a channel's mean dwarfs its spread. The random
        draws happen on every process (so that generators advance alike) and in the order a single
        ``GroupMixNorm`` layer makes them; only rank 0's are used.
        """
        channels = x.shape[1]
        counts, segments = K.counts_and_segments(groups, table_size, values_per_sample(x), x.dtype)
        local = K.group_moments(x, groups, table_size, counts=counts, segments=segments)
        gamma = F.gamma_draws(counts, self.alpha) if mix_here else torch.zeros_like(counts)
        packed = torch.cat([counts, local.mean.flatten(), local.var.flatten(), gamma, counts.new_tensor([float(mix_here)])])
        world = dist.get_world_size(self.process_group)
        every = _AllGather.apply(packed.unsqueeze(0), self.process_group, [1] * world)
        counts, means, variances, draws = every.split([table_size, table_size * channels, table_size * channels,
                                                       table_size + 1], dim=1)
        moments = combined_moments(counts.detach(), means.view(world, table_size, channels),
                                    variances.view(world, table_size, channels))
        draws = draws[0].detach()
        return bool(draws[-1] > 0.5), draws[:-1], moments, segments

    def extra_repr(self) -> str:
        return super().extra_repr() + f", process_group={self.process_group}"


def convert_sync_groupmixnorm(module: nn.Module, process_group: Any = None) -> nn.Module:
    """Replace every GroupMixNorm layer in ``module`` by a :class:`SyncGroupMixNorm` with the same options,
    parameters and running statistics (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does for
    batch normalization). Returns the converted module; call it before wrapping the model in DDP."""
    if isinstance(module, _GroupMixNorm) and not isinstance(module, SyncGroupMixNorm):
        options = {name: getattr(module, name) for name in _LAYER_OPTIONS}
        floating = [t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
        factory = {"device": floating[0].device, "dtype": floating[0].dtype} if floating else {}
        if options["num_groups"] is None:
            raise ValueError(f"cannot synchronize {module!r}: it was built without num_groups")
        sync = SyncGroupMixNorm(module.num_features, process_group=process_group, **options, **factory)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        converted = convert_sync_groupmixnorm(child, process_group)
        if converted is not child:
            setattr(module, name, converted)
    return module
