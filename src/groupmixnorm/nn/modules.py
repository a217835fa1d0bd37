"""GroupMixNorm modules, organised like ``torch.nn.modules.batchnorm``.

A shared base class owns parameters, running statistics and the training/evaluation logic; the public
classes only say which input shapes they accept.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from groupmixnorm.nn import _fused_cpu
from groupmixnorm.nn import _kernels as K
from groupmixnorm.nn import alignment
from groupmixnorm.nn import functional as F
from groupmixnorm.nn._core import (
    GroupMoments,
    batch_reference,
    combined_moments,
    normalization_map,
    per_sample_moments,
    values_per_sample,
)
from groupmixnorm.nn.routing import active_penalty_collector, current_groups, current_strata, reference_requested

MixMode = Literal["shared", "pairwise"]
EvalMode = Literal["population", "group", "posterior", "instance"]
_MIX_MODES = ("shared", "pairwise")
_EVAL_MODES = ("population", "group", "posterior", "instance")
_OUTPUT_SCALES = ("batch", "mixed")


class NonFiniteStatistics(ValueError):
    """A training batch whose statistics are NaN or infinite: bad input, or (in a training loop that has
    checked its data) a diverged model."""


class _GroupMixNorm(nn.Module):
    """Base class of :class:`GroupMixNorm1d` and :class:`GroupMixNorm2d`; see their docstrings."""

    _expected_dims: tuple[int, ...] = ()
    #: NumPy views of the parameters and buffers for the compiled CPU kernels, made once (None: none kept).
    _views: _fused_cpu.ViewCache | None = None
    #: The Gamma concentration of the compiled step's draws and what it was made for (table size, dtype,
    #: device, alpha): kept from step to step instead of filled anew (None: none kept).
    _concentration: tuple[tuple[object, ...], Tensor] | None = None

    def __init__(
        self,
        num_features: int,
        *,
        num_groups: int | None = None,
        mix: MixMode = "shared",
        alpha: float = 1.0,
        p: float = 1.0,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        output_scale: F.OutputScale = "batch",
        eval_mode: EvalMode = "population",
        align_covariance: bool = False,
        align_quantiles: int = 0,
        align_projections: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_options(num_features, num_groups, mix, alpha, p, eps, momentum, output_scale, eval_mode,
                       track_running_stats)
        for name, count in (("align_quantiles", align_quantiles), ("align_projections", align_projections)):
            if not isinstance(count, int) or count < 0:
                raise ValueError(f"{name} must be a non-negative int, got {count!r}")
        self.num_features = num_features
        self.num_groups = num_groups
        self.mix = mix
        self.alpha = alpha
        self.p = p
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.output_scale = output_scale
        self.eval_mode = eval_mode
        self.align_covariance = align_covariance
        self.align_quantiles = align_quantiles
        self.align_projections = align_projections
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self._register_running_buffers(factory)
        self.reset_parameters()
        self._views = _fused_cpu.ViewCache()

    def _register_running_buffers(self, factory: dict) -> None:
        channels = self.num_features
        self.register_buffer("running_mean", torch.zeros(channels, **factory))
        self.register_buffer("running_var", torch.ones(channels, **factory))
        self.register_buffer("running_mix_mean", torch.zeros(channels, **factory))
        self.register_buffer("running_mix_std", torch.ones(channels, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=factory["device"]))
        if self.num_groups is not None:
            self.register_buffer("running_group_mean", torch.zeros(self.num_groups, channels, **factory))
            self.register_buffer("running_group_var", torch.ones(self.num_groups, channels, **factory))
            self.register_buffer(
                "group_batches_tracked", torch.zeros(self.num_groups, dtype=torch.long, device=factory["device"])
            )

    def reset_running_stats(self) -> None:
        """Forget everything seen in training: population and group statistics back to N(0, 1).

        The mixed standard deviation starts at ``sqrt(1 + eps)`` so that an untrained layer in evaluation
        computes exactly what an untrained ``BatchNorm`` does.
        """
        if not self.track_running_stats:
            return
        self.running_mean.zero_()
        self.running_var.fill_(1.0)
        self.running_mix_mean.zero_()
        self.running_mix_std.fill_((1.0 + self.eps) ** 0.5)
        self.num_batches_tracked.zero_()
        if self.num_groups is not None:
            self.running_group_mean.zero_()
            self.running_group_var.fill_(1.0)
            self.group_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Reset running statistics, and the affine to the identity (weight 1, bias 0)."""
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, mix={self.mix!r}, alpha={self.alpha}, "
            f"p={self.p}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, output_scale={self.output_scale!r}, "
            f"eval_mode={self.eval_mode!r}"
        )

    # ----------------------------------------------------------------------------------------- forward

    def forward(self, x: Tensor, groups: Tensor | None = None) -> Tensor:
        """Normalize ``x``; ``groups`` (or the enclosing :func:`use_groups` block) gives each sample's group.

        In training the groups are required. In evaluation they are used only when ``eval_mode="group"``.
        """
        self._check_input(x)
        if groups is None:
            groups = current_groups()
        if self.training:
            if groups is None:
                raise ValueError(
                    f"{type(self).__name__} needs the protected-group ids in training: call layer(x, groups) "
                    "or run the model inside `with groupmixnorm.nn.use_groups(groups):`"
                )
            groups, table_size = self._checked_groups(groups, x)
            return _in_float32(self._train_step, x, groups, table_size)
        return _in_float32(self._forward_eval, x, groups)

    def _forward_eval(self, x: Tensor, groups: Tensor | None) -> Tensor:
        if self.eval_mode == "group":
            if groups is None:
                raise ValueError(
                    f"{type(self).__name__} has eval_mode='group', which needs the group ids in evaluation; "
                    "pass them, or set eval_mode='population' to predict without the protected attribute"
                )
            return self._forward_eval_group(x, self._check_groups(groups, x))
        if self.eval_mode == "posterior" and self.track_running_stats:
            return self._forward_eval_posterior(x)
        if self.eval_mode == "instance":
            return self._forward_eval_instance(x)
        return self._forward_eval_population(x, groups)

    def _train_step(self, x: Tensor, groups: Tensor, table_size: int) -> Tensor:
        """One training call (input in float32 or wider): normalize, update the running statistics, and
        report the alignment penalty to an enclosing :func:`collect_alignment` block."""
        weight, bias = _cast(self.weight, x.dtype), _cast(self.bias, x.dtype)
        total = x.shape[0] * values_per_sample(x)  # every sample is in some group, so this is counts.sum()
        if total < 2:
            raise ValueError(f"{type(self).__name__} needs more than one value per channel in training, got {tuple(x.shape)}")
        collector = active_penalty_collector()
        strata = current_strata()
        mix = self._mix_this_batch()
        if mix and strata is not None:
            out, moments = self._stratified_step(x, groups, self._checked_strata(strata, x), table_size, weight, bias)
        elif mix and self.mix == "shared" and self._may_fuse():
            out, moments = self._fused_shared_step(x, groups, table_size, weight, bias, total, collector is not None)
        else:
            moments, mixing, segments = self._moments_and_mixing(x, groups, table_size, mix)
            out = self._normalize(x, groups, mixing, moments, segments, weight, bias)
            if self.track_running_stats:
                detached = moments.detach()
                self._update_running_stats(detached, self._mixed_values(mixing, detached, x, groups))
        if collector is not None:
            collector.append(self._alignment(x, groups, moments, table_size, collector.condition))
        return out

    def _mix_this_batch(self) -> bool:
        """The ``p`` draw: whether this training batch is mixed (a draw from torch's generator unless ``p >= 1``)."""
        return self.p >= 1.0 or float(torch.rand(())) < self.p

    def _may_fuse(self) -> bool:
        """Whether a shared mixture may run as the one fused function (not inside :func:`use_reference` or
        while ``torch.compile`` traces)."""
        return not reference_requested()

    def _fused_shared_step(
        self, x: Tensor, groups: Tensor, table_size: int, weight: Tensor | None, bias: Tensor | None, total: int,
        with_moments: bool,
    ) -> tuple[Tensor, GroupMoments | None]:
        """The fast path: one fused autograd function computes the moments, the output and its gradient; the
        moments are returned (differentiable) when ``with_moments``."""
        running_dtype = self.running_mean.dtype if self.track_running_stats else None
        if _fused_cpu.applies(x, groups, weight, bias, running_dtype=running_dtype):
            return self._compiled_shared_step(x, groups, table_size, weight, bias, with_moments)
        counts, segments = K.counts_and_segments(groups, table_size, values_per_sample(x), x.dtype)
        all_eligible = K.every_group_eligible(counts)
        mixing = F.shared_mixing_weights(counts, self.alpha, all_eligible=all_eligible)
        out, moments, batch = K.shared_mix_norm(x, segments, counts, mixing, self.eps, self.output_scale, weight, bias,
                                                all_eligible, with_moments=with_moments)
        self._check_finite(batch.moments, x)
        if self.track_running_stats:
            self._update_running_stats(batch.moments, (batch.mixed_mean, batch.mixed_std), all_eligible, total)
        return out, moments

    def _compiled_shared_step(
        self, x: Tensor, groups: Tensor, table_size: int, weight: Tensor | None, bias: Tensor | None,
        with_moments: bool,
    ) -> tuple[Tensor, GroupMoments | None]:
        """:meth:`_fused_shared_step` through the compiled CPU kernels (:mod:`~groupmixnorm.nn._fused_cpu`): one
        call counts the groups, turns this batch's Gamma draws into the mixture (the same draws as
        :func:`~groupmixnorm.nn.functional.shared_mixing_weights`), normalizes and updates the running
        statistics; one call computes the gradients."""
        draws = self._gamma_draws(table_size, x)
        running = None
        if self.track_running_stats:
            buffers = self._buffers
            running = _fused_cpu.RunningStatistics(
                self.momentum, buffers["num_batches_tracked"], buffers["running_mean"], buffers["running_var"],
                buffers["running_mix_mean"], buffers["running_mix_std"],
                buffers.get("group_batches_tracked"), buffers.get("running_group_mean"),
                buffers.get("running_group_var"))
        step = _fused_cpu.shared_mix_norm(x, groups, draws, weight, bias, self.eps, self.output_scale == "batch",
                                          from_draws=True, with_moments=with_moments, running=running,
                                          views=self._views)
        finite = math.isfinite(step.summary)
        if finite and step.moments is None:
            return step.out, None
        counts = torch.from_numpy(step.samples).to(x.dtype) * values_per_sample(x)
        if not finite:  # the running statistics are untouched: say why
            self._check_finite(K.batch_statistics(counts, torch.from_numpy(step.stats)).moments, x)
        return step.out, GroupMoments(counts, *step.moments)

    def _gamma_draws(self, table_size: int, like: Tensor) -> Tensor:
        """The draws of :func:`~groupmixnorm.nn.functional.gamma_draws` for ``table_size`` groups in ``like``'s
        dtype and device (the same call on torch's generator), from a concentration tensor kept between steps."""
        key = (table_size, like.dtype, like.device, self.alpha)
        if self._concentration is None or self._concentration[0] != key:
            self._concentration = key, torch.full((table_size,), float(self.alpha), dtype=like.dtype, device=like.device)
        return torch._standard_gamma(self._concentration[1])

    def _stratified_step(
        self, x: Tensor, groups: Tensor, strata: Tensor, table_size: int, weight: Tensor | None, bias: Tensor | None
    ) -> tuple[Tensor, GroupMoments]:
        """Mixing within strata (:func:`~groupmixnorm.nn.mix_within`): every (stratum, group) cell is a group
        of the table, and each sample mixes only its stratum's cells, with one Dirichlet draw per stratum.

        Returns the output and the groups' moments over the whole batch (what the running statistics and
        the alignment penalty use, as without strata)."""
        if self.mix != "shared":
            raise ValueError(f"{type(self).__name__} mixes within strata only with mix='shared', got mix={self.mix!r}")
        num_strata = int(strata.max()) + 1
        cells = strata * table_size + groups
        cell_moments, segments = self._group_moments(x, cells, num_strata * table_size)
        self._check_finite(cell_moments, x)
        cell_counts = cell_moments.counts.view(num_strata, table_size)
        per_stratum = [F.shared_mixing_weights(counts, self.alpha) for counts in cell_counts]  # (G,) each
        mixing = torch.block_diag(*per_stratum)[strata]  # (N, S * G): each sample's stratum's mixture
        out = self._normalize(x, cells, mixing, cell_moments, segments, weight, bias)
        moments = self._merged_strata(cell_moments, num_strata)
        if self.track_running_stats:
            self._update_running_stats(moments.detach(), self._mixed_values(mixing, cell_moments.detach(), x, cells))
        return out, moments

    @staticmethod
    def _merged_strata(cell_moments: GroupMoments, num_strata: int) -> GroupMoments:
        """The groups' moments over the whole batch from those of its (stratum, group) cells."""
        channels = cell_moments.mean.shape[1]
        counts = cell_moments.counts.view(num_strata, -1)
        return combined_moments(counts, cell_moments.mean.view(num_strata, -1, channels),
                                cell_moments.var.view(num_strata, -1, channels))

    def _moments_and_mixing(
        self, x: Tensor, groups: Tensor, table_size: int, mix: bool
    ) -> tuple[GroupMoments, Tensor | None, K._Segments | None]:
        """This batch's (checked) moments, its mixing weights if it is mixed (else ``None``), and its rows
        by group for the fast path (``None`` on the reference path)."""
        moments, segments = self._group_moments(x, groups, table_size)
        self._check_finite(moments, x)
        if not mix:
            return moments, None, segments
        if self.mix == "shared":
            return moments, F.shared_mixing_weights(moments.counts, self.alpha), segments
        return moments, F.pairwise_mixing_weights(moments.counts, groups, self.alpha), segments

    @staticmethod
    def _group_moments(x: Tensor, groups: Tensor, table_size: int) -> tuple[GroupMoments, K._Segments | None]:
        """The group moments in plain autograd on the reference path (and no segments); otherwise through
        the fused function, with the rows by group that the fast path's map reuses."""
        if reference_requested():
            return F.plain_group_moments(x, groups, table_size), None
        counts, segments = K.counts_and_segments(groups, table_size, values_per_sample(x), x.dtype)
        return F.group_moments(x, groups, table_size, counts=counts, segments=segments), segments

    def _normalize(
        self, x: Tensor, groups: Tensor, mixing: Tensor | None, moments: GroupMoments,
        segments: K._Segments | None, weight: Tensor | None, bias: Tensor | None,
    ) -> Tensor:
        """The layer from this batch's moments: mixed (through the reference or the fast path), or, without
        ``mixing``, as if the batch held one group: batch norm (``output_scale="batch"``), else the identity."""
        if mixing is None:
            if self.output_scale == "batch":
                return F.batch_norm_train(x, moments, eps=self.eps, weight=weight, bias=bias)
            return F.apply_affine(x, weight, bias)
        options = {"eps": self.eps, "output_scale": self.output_scale, "weight": weight, "bias": bias}
        if reference_requested():
            return F.mix_normalize(x, groups, mixing, moments, **options)
        return K.mix_with_moments(x, segments, mixing, moments, **options)  # as F.fused_group_mix_norm does

    def _mixed_values(
        self, mixing: Tensor | None, moments: GroupMoments, x: Tensor, groups: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The mixed mean and deviation that the running statistics average, so that evaluation gives the
        population the overall mean and deviation that training gave the batch: the shared mixture's, or
        the batch's own statistics when the batch was not mixed.

        With one mixture per sample (pairwise mixing, or mixing within strata) the samples leave with
        different means, and the batch's spread holds those differences too: the values are then measured
        on the mixed batch itself, one more pass over it. (An average of the per-sample deviations leaves
        that spread out: evaluation came out 16 % narrower than training with pairwise mixing, and more with
        strata that differ.)"""
        if mixing is None:
            return batch_reference(moments, self.eps)
        table_mean, table_std = F.statistics_table(moments, self.eps)
        if mixing.dim() == 1:
            return mixing @ table_mean, mixing @ table_std
        return _moments_of_mixed_batch(x.detach(), groups, mixing, table_mean, table_std)

    def _check_finite(self, moments: GroupMoments, x: Tensor) -> None:
        """Refuse a batch whose statistics are not finite, before they reach the running statistics.

        Any NaN or infinity in ``x`` reaches the batch mean, so checking ``(C,)`` numbers catches it without
        another pass over the batch; so does a variance that overflows ``x``'s dtype.
        """
        if torch.compiler.is_compiling():
            return  # the check reads a number back from the batch, a graph break; eager calls make it
        summary = moments.batch_mean.detach() + moments.batch_var.detach()
        if math.isfinite(float(summary.sum(dtype=torch.float64))):  # three small ops on the common path
            return
        channels = torch.nonzero(~torch.isfinite(summary)).flatten()[:5].tolist()
        raise NonFiniteStatistics(
            f"{type(self).__name__} got non-finite values in training: channel(s) {channels} have a NaN or "
            f"infinite mean or variance (NaN or inf in the input, or values whose squares overflow {x.dtype})"
        )

    def _alignment(
        self, x: Tensor, groups: Tensor, moments: GroupMoments, table_size: int, condition: Tensor | None
    ) -> Tensor:
        """The alignment penalty of this input, or its share-weighted average within each condition value."""
        options = {"eps": self.eps, "covariance": self.align_covariance, "quantiles": self.align_quantiles,
                   "projections": self.align_projections}
        if condition is None:
            return alignment.alignment_penalty(x, groups, moments, **options)
        return alignment.conditional_alignment_penalty(x, groups, table_size, condition, **options)

    def _forward_eval_population(self, x: Tensor, groups: Tensor | None) -> Tensor:
        if not self.track_running_stats:
            return self._forward_without_running_stats(x, groups)
        mean, var = _in_dtype(x.dtype, self.running_mean, self.running_var)
        return self._normalize_eval(x, mean, torch.sqrt(var + self.eps))

    def _forward_eval_group(self, x: Tensor, groups: Tensor) -> Tensor:
        if not self.track_running_stats:
            return self._forward_without_running_stats(x, groups)
        if self.num_groups is None:
            raise ValueError("eval_mode='group' needs num_groups to keep per-group running statistics")
        seen = (self.group_batches_tracked[groups] > 0).unsqueeze(1)
        group_mean, group_var, mean, var = _in_dtype(
            x.dtype, self.running_group_mean, self.running_group_var, self.running_mean, self.running_var)
        mean = torch.where(seen, F.gather_rows(group_mean, groups), mean)
        var = torch.where(seen, F.gather_rows(group_var, groups), var)
        return self._normalize_eval(x, mean, torch.sqrt(var + self.eps))

    def _forward_eval_posterior(self, x: Tensor) -> Tensor:
        """Each sample normalized with the groups' running statistics mixed by its posterior group
        probabilities (:func:`~groupmixnorm.nn.functional.posterior_group_weights`); the population's
        while no group has statistics yet (chosen by tensor ops, not a branch, so the model exports)."""
        known = self.group_batches_tracked > 0
        any_known = known.any()
        group_mean, group_var, mean, var = _in_dtype(
            x.dtype, self.running_group_mean, self.running_group_var, self.running_mean, self.running_var)
        weights = F.posterior_group_weights(x, group_mean, group_var, eps=self.eps, known=known | ~any_known)
        mean = torch.where(any_known, weights @ group_mean, mean)
        std = torch.where(any_known, weights @ torch.sqrt(group_var + self.eps), torch.sqrt(var + self.eps))
        return self._normalize_eval(x, mean, std)

    def _forward_eval_instance(self, x: Tensor) -> Tensor:
        """Each sample normalized with its own per-channel mean and deviation over its positions (instance
        normalization), then given the mixed running statistics: no attribute, and whatever shifts a whole
        image's channels (a tint, a style) is gone."""
        if values_per_sample(x) < 2:
            raise ValueError(
                f"{type(self).__name__} has eval_mode='instance', which needs more than one position per channel "
                f"(input (N, C, L) or (N, C, H, W)); got shape {tuple(x.shape)}"
            )
        mean, var = per_sample_moments(x)
        return self._normalize_eval(x, mean, torch.sqrt(var + self.eps))

    def _normalize_eval(self, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        running_mean, running_var, mix_mean, mix_std, weight, bias = _in_dtype(
            x.dtype, self.running_mean, self.running_var, self.running_mix_mean, self.running_mix_std, self.weight,
            self.bias)
        reference = {}
        if self.output_scale == "batch":
            reference = {"reference_mean": running_mean, "reference_std": torch.sqrt(running_var + self.eps)}
        return F.normalize_with(x, mean, std, mix_mean, mix_std, weight=weight, bias=bias, **reference)

    def _forward_without_running_stats(self, x: Tensor, groups: Tensor | None) -> Tensor:
        """Evaluation without running statistics uses the batch, like ``BatchNorm`` does.

        With groups, the mixture is its expectation: equal weight on every eligible group.
        """
        if groups is None:
            table_size = 1
            groups = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        else:
            groups, table_size = self._checked_groups(groups, x)
        moments, segments = self._group_moments(x, groups, table_size)
        mixing = F.uniform_mixing_weights(moments.counts)
        weight, bias = _cast(self.weight, x.dtype), _cast(self.bias, x.dtype)
        return self._normalize(x, groups, mixing, moments, segments, weight, bias)

    # -------------------------------------------------------------------------------- running statistics

    @torch.no_grad()
    def _update_running_stats(
        self,
        moments: GroupMoments,
        mixed: tuple[Tensor, Tensor],
        all_eligible: bool | None = None,
        total: int | Tensor | None = None,
    ) -> None:
        """Fold this batch into the running statistics.

        ``mixed`` is the batch's (average) mixed mean and standard deviation, ``total`` the number of values
        per channel (``moments.counts.sum()``) if known.
        """
        if total is None:  # a tensor, not a number read back: no host sync (and no graph break when compiled)
            total = moments.counts.sum()
        unbiased_batch_var = moments.batch_var * (total / (total - 1))
        if self.running_var.dtype != unbiased_batch_var.dtype:
            self._check_storable(torch.cat([unbiased_batch_var, moments.var.flatten() * 2]))
        self.num_batches_tracked.add_(1)
        factor = self._momentum_factor()
        _lerp(
            [self.running_mean, self.running_var, self.running_mix_mean, self.running_mix_std],
            [moments.batch_mean, unbiased_batch_var, *mixed],
            factor,
        )
        if self.num_groups is not None:
            self._update_group_stats(moments, all_eligible)

    def _check_storable(self, variances: Tensor) -> None:
        """Refuse variances that the running buffers' (half-precision) dtype cannot hold, before any update.

        Group variances are checked at twice their size, which bounds their unbiased versions for any
        group of two or more values."""
        dtype = self.running_var.dtype
        if bool(torch.isfinite(variances.to(dtype)).all()):
            return
        raise ValueError(
            f"{type(self).__name__} keeps its running statistics in {dtype}, which cannot hold this batch's variance "
            f"({float(variances.max()):.3g}); keep the layer in float32 (as mixed-precision training does with "
            "normalization layers) or scale the input down"
        )

    def _update_group_stats(self, moments: GroupMoments, all_eligible: bool | None = None) -> None:
        counts = moments.counts
        if all_eligible is None:  # the masked update below is right in every case, and needs no host sync
            all_eligible = False if torch.compiler.is_compiling() else K.every_group_eligible(counts)
        if all_eligible:
            # Every group has its own statistics: one weight for all of them.
            self.group_batches_tracked.add_(1)
            factors = self._momentum_factor(self.group_batches_tracked, moments.mean.dtype)
            if isinstance(factors, Tensor):
                factors = factors.unsqueeze(1)
            unbiased = moments.var * (counts / (counts - 1)).unsqueeze(1)
        else:
            present = F.eligible_groups(counts)
            self.group_batches_tracked.add_(present)
            factors = self._momentum_factor(self.group_batches_tracked.clamp_min(1), moments.mean.dtype)
            factors = (factors * present).unsqueeze(1) if isinstance(factors, Tensor) else (
                present.to(moments.mean.dtype).mul_(factors).unsqueeze(1))
            unbiased = moments.var * (counts / (counts - 1).clamp_min(1)).unsqueeze(1)
        _lerp([self.running_group_mean, self.running_group_var], [moments.mean, unbiased], factors)

    def _momentum_factor(self, batches: Tensor | None = None, dtype: torch.dtype | None = None) -> Tensor | float:
        """The weight of the new batch: ``momentum``, or a cumulative average when it is ``None``.

        ``batches`` counts the batches seen (per group, say); by default ``num_batches_tracked``.
        """
        if self.momentum is not None:
            return self.momentum
        if batches is None:
            return 1.0 / int(self.num_batches_tracked)
        return 1.0 / batches.to(dtype)

    # ------------------------------------------------------------------------------------------ checks

    def _check_input(self, x: Tensor) -> None:
        if x.dim() not in self._expected_dims:
            expected = " or ".join(f"{d}D" for d in self._expected_dims)
            raise ValueError(f"{type(self).__name__} expects {expected} input (N, C, ...), got shape {tuple(x.shape)}")
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__} was built for {self.num_features} channels, input has {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )

    def _check_groups(self, groups: Tensor, x: Tensor) -> Tensor:
        return self._checked_groups(groups, x)[0]

    def _checked_groups(self, groups: Tensor, x: Tensor) -> tuple[Tensor, int]:
        """The validated ids as ``long`` on ``x``'s device, and the size of the statistics table they need."""
        groups = _per_sample_ids(groups, x, "groups")
        if groups.numel() == 0:
            return groups, self.num_groups if self.num_groups is not None else 1
        if self.num_groups is not None and torch.compiler.is_compiling():
            return groups, self.num_groups  # reading the ids' range would break the graph; eager calls check it
        smallest, largest = torch.aminmax(groups)
        smallest, largest = int(smallest), int(largest)
        if smallest < 0:
            raise ValueError(f"group ids must be non-negative, got {smallest}")
        if self.num_groups is not None and largest >= self.num_groups:
            raise ValueError(
                f"group id {largest} is out of range for num_groups={self.num_groups} (valid ids are 0..{self.num_groups - 1})"
            )
        return groups, self.num_groups if self.num_groups is not None else largest + 1

    def _checked_strata(self, strata: Tensor, x: Tensor) -> Tensor:
        """The validated strata of :func:`~groupmixnorm.nn.mix_within`, as ``long`` on ``x``'s device."""
        strata = _per_sample_ids(strata, x, "mix_within strata")
        if strata.numel() and int(strata.min()) < 0:
            raise ValueError(f"mix_within strata must be non-negative integers, got {int(strata.min())}")
        return strata


@torch.no_grad()
def _moments_of_mixed_batch(
    x: Tensor, groups: Tensor, mixing: Tensor, table_mean: Tensor, table_std: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (biased) deviation of ``sigma_mix * (x - mu_g) / sigma_g + mu_mix`` over the batch
    and its positions, for one mixture per sample (``mixing`` of shape ``(N, G)``)."""
    scale, shift, _ = normalization_map(table_mean[groups], table_std[groups], mixing @ table_mean,
                                        mixing @ table_std)
    mixed = F.apply_affine(x, scale, shift)
    values = mixed.transpose(0, 1).flatten(1) if x.dim() > 2 else mixed.T  # (C, values)
    return values.mean(dim=1), values.var(dim=1, unbiased=False).sqrt()


def _per_sample_ids(ids: Tensor, x: Tensor, name: str) -> Tensor:
    """``ids`` checked to be one integer per sample of ``x``, as ``long`` on ``x``'s device."""
    if not isinstance(ids, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of integer ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype (e.g. torch.long), got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != x.shape[0]:
        raise ValueError(f"{name} must have shape (N,) = ({x.shape[0]},) to match the batch, got {tuple(ids.shape)}")
    if ids.dtype != torch.long or ids.device != x.device:
        ids = ids.to(device=x.device, dtype=torch.long)
    return ids


def _in_float32(function: Callable[..., Tensor], x: Tensor, *args: object) -> Tensor:
    """``function(x, *args)``, with float16 and bfloat16 input computed in float32 and returned in its dtype.

    In training, half-precision sums over a batch lose whole units (counts too) and the CPU's random draws
    need float32; in evaluation the map ``x * (1 / std) - mean / std`` overflows float16 once
    ``|mean| / std`` does, even where the output is small.
    """
    if x.dtype in (torch.float16, torch.bfloat16):
        return function(x.float(), *args).to(x.dtype)
    return function(x, *args)


def _cast(parameter: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """``parameter`` in ``dtype`` (a differentiable cast), or as is."""
    return parameter if parameter is None or parameter.dtype == dtype else parameter.to(dtype)


def _in_dtype(dtype: torch.dtype, *tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """``tensors`` (buffers first, then parameters) in ``dtype``: float32 when a half-precision layer
    evaluates (see ``forward``); as they are, with one comparison, in the common case."""
    if tensors[0].dtype == dtype:
        return tensors
    return tuple(_cast(t, dtype) for t in tensors)


def _lerp(buffers: list[Tensor], values: list[Tensor], weight: Tensor | float) -> None:
    """``buffer.lerp_(value, weight)`` for each pair, casting values (and a tensor weight) to the buffer's dtype."""
    values = [v.to(b.dtype) if v.dtype != b.dtype else v for b, v in zip(buffers, values)]
    if isinstance(weight, Tensor) or any(b.dtype != buffers[0].dtype for b in buffers):
        for buffer, value in zip(buffers, values):
            buffer.lerp_(value, weight.to(buffer.dtype) if isinstance(weight, Tensor) else weight)
        return
    torch._foreach_lerp_(buffers, values, weight)


class GroupMixNorm1d(_GroupMixNorm):
    r"""GroupMixNorm over a 2D ``(N, C)`` or 3D ``(N, C, L)`` input.

    In training, each protected group of the mini-batch is normalized with its own per-channel mean and
    standard deviation (over ``N`` and ``L``), and every sample is then re-scaled with one random convex
    combination of the groups' statistics, so that all groups leave the layer with the same per-channel
    mean and standard deviation (Pandey et al., "GroupMixNorm Layer for Learning Fair Models",
    PAKDD 2023):

    .. math::
        y = \gamma \cdot \frac{\sigma_{mix}\,(x - \mu_g)/\sigma_g + \mu_{mix} - \mu_B}{\sigma_B} + \beta,
        \qquad \mu_{mix} = \sum_g w_g \mu_g,\ \sigma_{mix} = \sum_g w_g \sigma_g,\ w \sim \mathrm{Dir}(\alpha)

    where ``g`` is the sample's group and ``B`` the whole batch. The division by the batch statistics
    (``output_scale="batch"``, the default) puts the output in batch-normalization units, so the layer
    replaces ``BatchNorm1d`` one for one and equals it on a batch of a single group; ``output_scale="mixed"``
    leaves it out and is the paper's layer verbatim. Both give every group identical output moments.
    Inside :func:`~groupmixnorm.nn.mix_within` the groups are mixed within each stratum (label) only.

    Args:
        num_features: ``C``, the number of channels.
        num_groups: number of protected groups ``G``; ids must lie in ``[0, G)``. Needed for per-group
            running statistics (``eval_mode="group"``); ``None`` accepts any non-negative ids.
        mix: ``"shared"`` draws one Dirichlet(``alpha``) mixture over the groups present for the whole batch;
            ``"pairwise"`` mixes each sample's group with one other random group, weight Beta(``alpha``, ``alpha``)
            (MixStyle-like). Groups then differ within a batch; with two groups they match in expectation,
            with ``G > 2`` the expected gap between two groups' moments shrinks to ``(G-2)/(2(G-1))`` of its size.
        alpha: concentration of the Dirichlet / Beta draws.
        p: probability of mixing in a training batch; otherwise the batch is treated as one group.
        eps: added to variances for numerical stability.
        momentum: weight of a new batch in the running statistics; ``None`` for a cumulative average.
        affine: learn a per-channel scale and shift, as in batch normalization.
        track_running_stats: keep running statistics for evaluation (population, mixed and per group).
        output_scale: ``"batch"`` or ``"mixed"``, see above.
        eval_mode: ``"population"`` (default) normalizes every sample with the running population
            statistics and needs no protected attribute; ``"group"`` normalizes each sample with its group's
            running statistics and needs ``groups`` at prediction time; ``"posterior"`` needs no attribute
            either: it mixes the groups' running statistics by each sample's posterior group probability
            under them (:func:`~groupmixnorm.nn.functional.posterior_group_weights`), so that evaluation
            removes what training's group statistics removed as far as ``x`` reveals the group;
            ``"instance"`` normalizes each sample with its own statistics over its positions (images, or
            ``(N, C, L)`` input), then gives it the mixed running statistics.
        align_covariance: whether the alignment penalty reported inside
            :func:`~groupmixnorm.nn.collect_alignment` also compares channel covariances, not only
            per-channel means and deviations.
        align_quantiles: if positive, the alignment penalty compares this many quantiles of every channel
            (whole distributions) instead of means and deviations.
        align_projections: if positive, the alignment penalty compares quantiles along this many random
            directions of the channels (a sliced distance, redrawn every batch) instead of along each channel.

    Degenerate batches: an absent group takes no weight; a group with fewer than two values per channel is
    normalized with the batch statistics and takes no weight; a batch with one group is batch
    normalization (or the identity with ``output_scale="mixed"``).

    Numerics: float16 and bfloat16 input is computed in float32 (statistics, mixing and, in evaluation, the
    normalization map) and returned in its own dtype. A NaN or infinity in a training batch, or values whose
    squares overflow, raise a ``ValueError`` before the running statistics change (the check reads the
    ``(C,)`` batch statistics, not the batch); so does a variance that float16 running statistics cannot
    hold. Gradients come back in the input's dtype: a float16 gradient beyond its range is ``inf``, as for
    any float16 operation, and ``torch.amp.GradScaler`` skips that step.

    Shape:
        - Input: ``(N, C)`` or ``(N, C, L)``; groups: ``(N,)`` integer ids.
        - Output: same shape as the input.

    Examples::

        >>> layer = GroupMixNorm1d(16, num_groups=2)
        >>> x, a = torch.randn(32, 16), torch.randint(0, 2, (32,))
        >>> y = layer(x, a)          # training: groups required
        >>> layer.eval(); y = layer(x)   # deployment: no protected attribute
    """

    _expected_dims = (2, 3)


class GroupMixNorm2d(_GroupMixNorm):
    """GroupMixNorm over a 4D ``(N, C, H, W)`` input; statistics per channel over ``N, H, W``.

    Same arguments and behaviour as :class:`GroupMixNorm1d`. A single image already has ``H * W`` values per
    channel, so a group of one image keeps its own statistics.
    """

    _expected_dims = (4,)


def _check_options(
    num_features: int,
    num_groups: int | None,
    mix: str,
    alpha: float,
    p: float,
    eps: float,
    momentum: float | None,
    output_scale: str,
    eval_mode: str,
    track_running_stats: bool,
) -> None:
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    if num_groups is not None and (not isinstance(num_groups, int) or num_groups < 1):
        raise ValueError(f"num_groups must be a positive int or None, got {num_groups!r}")
    if mix not in _MIX_MODES:
        raise ValueError(f"mix must be one of {_MIX_MODES}, got {mix!r}")
    if not 0 < alpha <= torch.finfo(torch.float32).max:  # the draws are made in float32 (or float64)
        raise ValueError(f"alpha must be > 0 and at most float32's largest value (3.4e38), got {alpha!r}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1], got {p!r}")
    if not 0 < eps < math.inf:
        raise ValueError(f"eps must be > 0 and finite, got {eps!r}")
    if momentum is not None and not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
    if output_scale not in _OUTPUT_SCALES:
        raise ValueError(f"output_scale must be one of {_OUTPUT_SCALES}, got {output_scale!r}")
    if eval_mode not in _EVAL_MODES:
        raise ValueError(f"eval_mode must be one of {_EVAL_MODES}, got {eval_mode!r}")
    if eval_mode == "instance" and not track_running_stats:
        raise ValueError("eval_mode='instance' gives each sample the running mixed statistics; it needs "
                         "track_running_stats=True")
    if eval_mode in ("group", "posterior") and num_groups is None and track_running_stats:
        raise ValueError(f"eval_mode={eval_mode!r} needs num_groups, to keep running statistics per group")
