"""The shared-mixture training step on the CPU as two compiled loops each way (numba).

:class:`~groupmixnorm.nn._kernels._SharedMixFunction` computes the training-time layer with about sixty
ATen operations per direction, each with a few microseconds of fixed cost; on small batches that fixed
cost is most of the step. The kernels here compute the same numbers in two passes over the batch per
direction and the ``(G, C)`` arithmetic in between, in one compiled call each:

- forward: per (group, channel) sums of ``x - k`` and ``(x - k)^2`` with ``k`` the group's first value
  in that channel (shifted sums, in float64: accurate when the mean is large relative to the spread),
  the moments, the statistics table with its batch fallback, the mixture, the output map; then the
  output ``y = (x - mean_table[g]) * scale[g] + level``.
- backward: per (group, channel) sums of ``dy`` and ``dy * (x - mean_table[g])``, the chain rule of
  :func:`~groupmixnorm.nn._kernels._shared_mix_table_backward` (fallback and batch-reference terms
  included), then ``dx = dy * scale[g] + slope[g] * (x - mean[g]) + offset[g]``. Gradients that reach the
  group and batch moments directly (an alignment penalty on them) join the chain rule's before that pass.

In the layers' training step the forward call also counts the groups, turns the batch's Gamma draws into
the mixture and updates the running statistics in place (:class:`RunningStatistics`), so that a step is
one compiled call each way; the layer's parameters and buffers are handed to it as NumPy views made once
(:class:`ViewCache`). No batch-sized temporary besides the output (and ``dx``); the ``(G, C)`` work arrays
are NumPy memory, and the forward hands its statistics table to the backward (:data:`Table`) instead of
the backward computing it again. The input is viewed as ``(N, C, L)``, ``L`` the product of the spatial
sizes (1 for 2D input); float32 and float64.

**When it is used** (:func:`applies`): numba imported and compiles, ``x`` is a contiguous CPU tensor in
float32 or float64, the mixture is shared (1-D), and either torch runs on one thread or ``x`` has at most :data:`SERIAL_MAX_ELEMENTS`
elements. The loops are serial (a ``prange`` would meet torch's OpenMP threads and reorder the sums), so
above that size a multi-threaded torch keeps its own kernels. Everything else (GPU, float16 and bfloat16
input, one mixture per sample) stays on the torch path; float16 running statistics
with float32 computation use the kernels for the output and torch for the update. The first call of each
dtype compiles the kernels (seconds; numba caches them on disk for the next process).
``GROUPMIXNORM_NUMBA=0`` in the environment, or :func:`torch_path` in code, turns the kernels off.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency, but the layer works without it (the torch path)
    from numba import njit
except Exception:  # noqa: BLE001 - a broken install (say, a numba built for another numpy) raises anything
    njit = None

#: Whether the kernels may be used at all: numba imported, and not turned off by ``GROUPMIXNORM_NUMBA=0``.
AVAILABLE = njit is not None and os.environ.get("GROUPMIXNORM_NUMBA", "1") != "0"

#: Above this many elements a multi-threaded torch runs the torch path: torch's ATen kernels split large
#: batches across threads and the loops here do not. On one thread the kernels are faster at every size;
#: on the project's busy 2-core machine they still beat the torch path on 2 threads up to 4M elements
#: (5.7 against 33 ms at (4096, 64), 76 against 283 ms at (65536, 64)), which says little about a machine
#: with many idle cores; the bound is a guess on the safe side until measured there.
SERIAL_MAX_ELEMENTS = 1 << 20

_DTYPES = (torch.float32, torch.float64)
_enabled = True
_compiled: dict[torch.dtype, bool] = {}  # whether the kernels compiled (and ran) for each dtype
# Reassociation lets LLVM vectorize the reductions; NaN and infinity keep their meaning (the layer's
# finiteness check reads the batch statistics).
_FASTMATH = {"reassoc", "contract"}
#: ``error_model="numpy"``: a float division by zero gives infinity or NaN, as in NumPy, instead of raising
#: ``ZeroDivisionError``. Python's rule puts a test and a branch before every division, and that branch
#: keeps LLVM from vectorizing the loops that divide (the (G, C) arithmetic); no division here can meet
#: a zero divisor that the finiteness check would not report.
_COMPILE_OPTIONS = {"cache": True, "fastmath": _FASTMATH, "nogil": True, "error_model": "numpy"}


@contextmanager
def torch_path() -> Iterator[None]:
    """Within the block the layers skip the compiled kernels (for tests, and to compare the two paths)."""
    global _enabled
    previous, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = previous


def applies(
    x: Tensor, groups: Tensor, weight: Tensor | None, bias: Tensor | None, *, mixing: Tensor | None = None,
    running_dtype: torch.dtype | None = None,
) -> bool:
    """Whether the shared-mixture step of ``x`` runs through the compiled kernels (see the module docstring).

    ``mixing`` is the mixture if already drawn; ``running_dtype`` the dtype of running statistics that the
    step is to update (they must be in ``x``'s dtype).
    """
    return (
        AVAILABLE
        and _enabled
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and x.is_contiguous()
        and x.numel() > 0
        and (x.numel() <= SERIAL_MAX_ELEMENTS or torch.get_num_threads() == 1)
        and groups.dtype == torch.long
        and (mixing is None or (mixing.dim() == 1 and mixing.dtype == x.dtype))
        and (weight is None) == (bias is None)
        and (weight is None or weight.dtype == bias.dtype == x.dtype)
        and (running_dtype is None or running_dtype == x.dtype)
        and (_compiled[x.dtype] if x.dtype in _compiled else _compile(x.dtype))
    )


def _compile(dtype: torch.dtype) -> bool:
    """Compile (or load from numba's cache) and run the kernels once on a tiny batch; ``False`` if that fails,
    after which this dtype stays on the torch path. The trial runs with autograd on, whatever mode the first
    caller is in (a first training step under ``torch.no_grad()`` would otherwise fail it)."""
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.linspace(-1.0, 1.0, 12, dtype=dtype).reshape(4, 3).requires_grad_()
            groups = torch.tensor([0, 1, 0, 1])
            mixing = torch.tensor([0.5, 0.5], dtype=dtype)
            ones = torch.ones(3, dtype=dtype)
            out = shared_mix_norm(x, groups, mixing, ones, ones, 1e-5, True)[0]
            out.backward(torch.ones_like(out))
            ok = bool(torch.isfinite(x.grad).all())
    except Exception:  # noqa: BLE001 - any failure to compile means: use the torch path
        ok = False
    _compiled[dtype] = ok
    return ok


_EMPTY = {dtype: np.empty(0, dtype=np.float32 if dtype == torch.float32 else np.float64) for dtype in _DTYPES}
_NO_RUNNING = {dtype: (np.empty(0, np.int64), *([_EMPTY[dtype]] * 4), np.empty(0, np.int64),
                       *([_EMPTY[dtype].reshape(0, 0)] * 2)) for dtype in _DTYPES}
#: The backward kernel's gradients of the moments when none reach them (no alignment penalty).
_NO_MOMENT_GRADS = {dtype: (_EMPTY[dtype].reshape(0, 0), _EMPTY[dtype].reshape(0, 0), _EMPTY[dtype], _EMPTY[dtype])
                    for dtype in _DTYPES}


def _array(t: Tensor | None, dtype: torch.dtype) -> np.ndarray:
    """A C-contiguous array of ``t`` (sharing its memory if it can), or an empty one for ``None``: the kernels
    are compiled for C-contiguous arrays only."""
    return _EMPTY[dtype] if t is None else t.detach().contiguous().numpy()


class RunningStatistics(NamedTuple):
    """The running statistics that a training step updates in place (those of ``_GroupMixNorm``), with its
    ``momentum`` (``None``: a cumulative average). The group buffers are ``None`` without ``num_groups``."""

    momentum: float | None
    num_batches_tracked: Tensor
    mean: Tensor
    var: Tensor
    mix_mean: Tensor
    mix_std: Tensor
    group_batches_tracked: Tensor | None
    group_mean: Tensor | None
    group_var: Tensor | None

    def tensors(self) -> tuple[Tensor, ...]:
        """The buffers that the forward kernel updates, in its order (the group ones only with ``num_groups``)."""
        tensors = (self.num_batches_tracked, self.mean, self.var, self.mix_mean, self.mix_std)
        if self.group_mean is None:
            return tensors
        return (*tensors, self.group_batches_tracked, self.group_mean, self.group_var)


class ViewCache:
    """NumPy views of tensors that live from step to step (a layer's parameters and running statistics),
    made again only when one of them is in other memory than last time (moved, cast or reassigned).

    A view shares its tensor's memory, so in-place updates (an optimizer's, the running averages') show
    through it; and it holds that memory, so no other tensor can take the address while it is cached. A
    non-contiguous tensor is not cached: its array would be a copy.
    """

    __slots__ = ("_key", "_arrays")

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._arrays: tuple[np.ndarray, ...] = ()

    def __reduce__(self) -> tuple[type, tuple]:
        return ViewCache, ()  # a copy or a pickle starts empty: its views would be of other tensors' memory

    def of(self, tensors: tuple[Tensor | None, ...], dtype: torch.dtype) -> tuple[np.ndarray, ...]:
        """The arrays of ``tensors`` (:func:`_array`: an empty one for ``None``), from the cache if none moved."""
        key = (dtype, *(0 if t is None else t.data_ptr() for t in tensors))
        if key != self._key:
            arrays = tuple(_array(t, dtype) for t in tensors)
            if all(t is None or t.is_contiguous() for t in tensors):
                self._key, self._arrays = key, arrays
            return arrays
        return self._arrays


#: What the forward kernel hands the backward besides ``stats``: the table's means and the output map's
#: scales, ``(G, C)`` in ``x``'s dtype as the output was computed with them, and the table's inverse
#: deviations, ``(G, C)`` float64 (a group without statistics of its own holds the batch's in its rows).
Table = tuple[np.ndarray, np.ndarray, np.ndarray]


class Step(NamedTuple):
    """What one training-time call of the kernels gives: the output; ``stats``, ``(2G + 4, C)`` in ``x``'s
    dtype (the group means, the group variances, then the batch's mean and variance and the mixed mean
    and deviation); the samples per group; whether every group has statistics of its own; the sum of the
    batch's means and variances (finite if and only if they all are); the statistics table as the output
    map used it (:data:`Table`); and, if asked for, the group means and variances and the batch's mean and
    variance as differentiable tensors (for the alignment penalties)."""

    out: Tensor
    stats: np.ndarray
    samples: np.ndarray
    all_eligible: bool
    summary: float
    table: Table
    moments: tuple[Tensor, Tensor, Tensor, Tensor] | None = None


class SharedMixFunction(torch.autograd.Function):
    """The training-time layer with one shared mixture, through the compiled kernels.

    ``apply(x, groups, mixing, weight, bias, options, sink)`` returns the output, and with
    ``options.with_moments`` the four moments of :class:`Step` too; it appends the :class:`Step` to
    ``sink``. The backward gives ``x``, the mixture, the weight and the bias their gradients (first
    derivatives only), those reaching the moments included.
    """

    @staticmethod
    def forward(ctx, x, groups, mixing, weight, bias, options, sink):  # noqa: ANN001, ANN205
        step, arrays = forward(x, groups, mixing, weight, bias, options)
        ctx.save_for_backward(x, weight, bias)  # for autograd's check that they are not modified in place
        ctx.arrays, ctx.options = arrays, options
        ctx.stats, ctx.samples, ctx.table = step.stats, step.samples, step.table
        if not options.with_moments:
            sink.append(step)
            return step.out
        # Outputs of their own, not views of one table: autograd tracks each output separately.
        moments = tuple(part.clone() for part in _moments_of(step))
        sink.append(step._replace(moments=moments))
        return (step.out, *moments)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, *d_moments):  # noqa: ANN001, ANN205
        x, _, _ = ctx.saved_tensors
        needs_x, _, needs_mixing, needs_weight, needs_bias = ctx.needs_input_grad[:5]
        if not d_out.is_contiguous():
            d_out = d_out.contiguous()
        d_x = torch.empty_like(x) if needs_x else d_out
        x_array, groups, mixing, weight, bias = ctx.arrays
        n, options = x_array.shape[0], ctx.options
        moment_grads = (tuple(_array(d.contiguous(), x.dtype) for d in d_moments) if d_moments
                        else _NO_MOMENT_GRADS[x.dtype])
        d_mixing, d_weight, d_bias = _backward_kernel(
            x_array, options.positions, groups, d_out.numpy().reshape(n, -1), mixing, weight, bias, options.eps,
            options.in_batch_units, ctx.stats, ctx.samples, ctx.table, moment_grads,
            d_x.numpy().reshape(n, -1), needs_x)
        return (d_x if needs_x else None, None, torch.from_numpy(d_mixing) if needs_mixing else None,
                torch.from_numpy(d_weight) if needs_weight else None, torch.from_numpy(d_bias) if needs_bias else None,
                None, None)


class Options(NamedTuple):
    """The fixed arguments of one call: ``eps``, the output in batch units (``output_scale="batch"``),
    ``mixing`` holding Gamma draws to turn into the mixture, the moments wanted as outputs, the running
    statistics to update, the :class:`ViewCache` of the caller, and the spatial positions per channel."""

    eps: float
    in_batch_units: bool
    from_draws: bool = False
    with_moments: bool = False
    running: RunningStatistics | None = None
    views: ViewCache | None = None
    positions: int = 1


def shared_mix_norm(
    x: Tensor, groups: Tensor, mixing: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
    in_batch_units: bool, *, from_draws: bool = False, with_moments: bool = False,
    running: RunningStatistics | None = None, views: ViewCache | None = None,
) -> Step:
    """The :class:`Step` of :func:`forward`, its output (and moments) differentiable in ``x``, ``mixing``,
    ``weight`` and ``bias`` when grad mode is on and one of them requires it.

    With ``from_draws`` ``mixing`` holds Gamma draws, one per group, and is overwritten with the mixture
    they give (as :func:`~groupmixnorm.nn.functional.weights_from_gamma` computes it). ``running``
    statistics are updated in place if the batch's statistics are finite. ``views`` caches the NumPy views
    of the weight, bias and running statistics from call to call.
    """
    options = Options(eps, in_batch_units, from_draws, with_moments, running, views, math.prod(x.shape[2:]))
    if not (torch.is_grad_enabled() and (x.requires_grad or mixing.requires_grad
                                         or (weight is not None and (weight.requires_grad or bias.requires_grad)))):
        step = forward(x, groups, mixing, weight, bias, options)[0]
        return step._replace(moments=_moments_of(step)) if with_moments else step
    sink: list[Step] = []
    SharedMixFunction.apply(x, groups, mixing, weight, bias, options, sink)
    return sink[0]


def forward(
    x: Tensor, groups: Tensor, mixing: Tensor, weight: Tensor | None, bias: Tensor | None, options: Options,
) -> tuple[Step, tuple[np.ndarray, ...]]:
    """The forward pass without autograd: the :class:`Step` (no moments) and the inputs as the kernels see them."""
    n = x.shape[0]
    out = torch.empty_like(x)
    running = options.running
    tensors = (weight, bias) if running is None else (weight, bias, *running.tensors())
    views = tuple(_array(t, x.dtype) for t in tensors) if options.views is None else options.views.of(tensors, x.dtype)
    arrays = (x.detach().numpy().reshape(n, -1), groups.numpy(), mixing.detach().numpy(), views[0], views[1])
    momentum = -1.0 if running is None or running.momentum is None else running.momentum
    stats, samples, all_eligible, summary, table = _forward_kernel(
        arrays[0], options.positions, arrays[1], arrays[2], options.from_draws, arrays[3], arrays[4], options.eps,
        options.in_batch_units, out.numpy().reshape(n, -1), momentum,
        _NO_RUNNING[x.dtype] if running is None else _running_arrays(views[2:], x.dtype))
    return Step(out, stats, samples, bool(all_eligible), float(summary), table), arrays


def _moments_of(step: Step) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The group means and variances and the batch's mean and variance: views of ``step.stats``."""
    num_groups = step.samples.shape[0]
    stats = torch.from_numpy(step.stats)
    return stats[:num_groups], stats[num_groups:2 * num_groups], stats[2 * num_groups], stats[2 * num_groups + 1]


def _running_arrays(arrays: tuple[np.ndarray, ...], dtype: torch.dtype) -> tuple[np.ndarray, ...]:
    """The running statistics' arrays as the forward kernel takes them: eight, the group ones empty without
    ``num_groups``; the batch counter as a 1-element array."""
    arrays = (arrays[0].reshape(1), *arrays[1:])
    return arrays if len(arrays) == 8 else (*arrays, *_NO_RUNNING[dtype][5:])


# ------------------------------------------------------------------------------------------ the kernels
# x and the output (or dx) are (N, C * L), C-contiguous: channel c of sample n is x[n, c * L : (c + 1) * L].


def _forward_impl(x, positions, groups, mixing, from_draws, weight, bias, eps, in_batch_units, out, momentum,  # noqa: ANN001, ANN202, E501
                  running):
    num = x.shape[0]
    channels = x.shape[1] // positions
    num_groups = mixing.shape[0]
    affine = weight.shape[0] > 0
    # Pass 1: sums of x - k and (x - k)^2 per group and channel, k the group's first value in the channel.
    samples = np.zeros(num_groups, np.int64)
    shift = np.empty((num_groups, channels), x.dtype)
    first = np.zeros((num_groups, channels))
    second = np.zeros((num_groups, channels))
    for n in range(num):
        g = groups[n]
        if g < 0 or g >= num_groups:
            raise IndexError("a group id is out of range for the number of groups")
        row, k, s1, s2 = x[n], shift[g], first[g], second[g]
        if samples[g] == 0:
            for c in range(channels):
                k[c] = row[c * positions]
        samples[g] += 1
        if positions == 1:
            for c in range(channels):
                d = np.float64(row[c] - k[c])
                s1[c] += d
                s2[c] += d * d
        else:
            for c in range(channels):
                values, kc = row[c * positions:(c + 1) * positions], k[c]
                a = 0.0
                b = 0.0
                for p in range(positions):
                    d = np.float64(values[p] - kc)
                    a += d
                    b += d * d
                s1[c] += a
                s2[c] += b

    # The moments (in float64, written out in x's dtype), the batch's by the law of total variance. The
    # (G, C) loops run over rows with any branch outside the loop over channels, so that they vectorize.
    total = num * positions
    stats = np.zeros((2 * num_groups + 4, channels), x.dtype)
    batch_mean = np.zeros(channels)
    batch_var = np.zeros(channels)
    for g in range(num_groups):
        count = samples[g] * positions
        if count == 0:
            continue
        inverse = 1.0 / count
        s1, s2, k = first[g], second[g], shift[g]
        for c in range(channels):
            m = s1[c] * inverse
            s1[c] = k[c] + m  # now the mean
            s2[c] = max(s2[c] * inverse - m * m, 0.0)  # now the variance
            batch_mean[c] += count * s1[c]
    batch_mean /= total
    for g in range(num_groups):
        count = samples[g] * positions
        if count == 0:
            continue
        s1, s2, mean_out, var_out = first[g], second[g], stats[g], stats[num_groups + g]
        for c in range(channels):
            d = s1[c] - batch_mean[c]
            batch_var[c] += count * (d * d + s2[c])
            mean_out[c] = s1[c]
            var_out[c] = s2[c]
    batch_var /= total
    batch_std = np.sqrt(batch_var + eps)

    # The mixture (from Gamma draws if asked), the statistics table and the map.
    eligible = samples * positions >= 2
    all_eligible = eligible.all()
    if from_draws:
        mixable = eligible if eligible.any() else samples > 0
        tiny = np.finfo(mixing.dtype).tiny
        weight_sum = 0.0
        for g in range(num_groups):
            mixing[g] = max(mixing[g], tiny) if mixable[g] else 0.0
            weight_sum += mixing[g]
        for g in range(num_groups):
            mixing[g] = mixing[g] / weight_sum
    mixed_mean = np.zeros(channels)
    mixed_std = np.zeros(channels)
    for g in range(num_groups):
        w = np.float64(mixing[g])
        s1, s2 = first[g], second[g]
        if eligible[g]:
            for c in range(channels):
                s2[c] = np.sqrt(s2[c] + eps)  # now the table's deviation
        else:
            for c in range(channels):
                s1[c] = batch_mean[c]
                s2[c] = batch_std[c]
        for c in range(channels):
            mixed_mean[c] += w * s1[c]
            mixed_std[c] += w * s2[c]
    factor, offset = _output_map(weight, bias, affine, in_batch_units, batch_mean, batch_var, eps, channels)
    spread = mixed_std * factor
    centre = shift  # reused: the table's means in x's dtype
    scale = np.empty((num_groups, channels), x.dtype)
    inverse_std = second  # reused: the table's inverse deviations, kept for the backward
    for g in range(num_groups):
        s1, s2, m, sc = first[g], second[g], centre[g], scale[g]
        for c in range(channels):
            m[c] = s1[c]
            inverse = 1.0 / s2[c]
            s2[c] = inverse
            sc[c] = spread[c] * inverse
    level = (mixed_mean * factor + offset).astype(x.dtype)

    # Pass 2: y = (x - mean_table[g]) * scale[g] + level.
    for n in range(num):
        g = groups[n]
        row, dest, m, s = x[n], out[n], centre[g], scale[g]
        if positions == 1:
            for c in range(channels):
                dest[c] = (row[c] - m[c]) * s[c] + level[c]
        else:
            for c in range(channels):
                values, target = row[c * positions:(c + 1) * positions], dest[c * positions:(c + 1) * positions]
                mc, sc, lc = m[c], s[c], level[c]
                for p in range(positions):
                    target[p] = (values[p] - mc) * sc + lc

    stats[2 * num_groups] = batch_mean
    stats[2 * num_groups + 1] = batch_var
    stats[2 * num_groups + 2] = mixed_mean
    stats[2 * num_groups + 3] = mixed_std
    summary = 0.0  # of the statistics as stored: a variance may overflow float32 but not float64
    for c in range(channels):
        summary += np.float64(stats[2 * num_groups, c]) + np.float64(stats[2 * num_groups + 1, c])
    if running[0].shape[0] and np.isfinite(summary):
        _fold_running(stats, samples, positions, momentum, *running)
    return stats, samples, all_eligible, summary, (centre, scale, inverse_std)


def _fold_running(stats, samples, positions, momentum, batches, mean, var, mixed_mean, mixed_std,  # noqa: ANN001, ANN202
                  group_batches, group_mean, group_var):
    """The running statistics' update of ``_GroupMixNorm._update_running_stats`` in place (``momentum < 0``
    for a cumulative average): population, mixture, and every group with statistics of its own."""
    num_groups, channels = samples.shape[0], stats.shape[1]
    total = samples.sum() * positions
    batches[0] += 1
    factor = momentum if momentum >= 0 else 1.0 / batches[0]
    correction = total / (total - 1)
    for c in range(channels):
        mean[c] += factor * (stats[2 * num_groups, c] - mean[c])
        var[c] += factor * (stats[2 * num_groups + 1, c] * correction - var[c])
        mixed_mean[c] += factor * (stats[2 * num_groups + 2, c] - mixed_mean[c])
        mixed_std[c] += factor * (stats[2 * num_groups + 3, c] - mixed_std[c])
    if group_mean.shape[0] == 0:
        return
    for g in range(num_groups):
        count = samples[g] * positions
        if count < 2:
            continue
        group_batches[g] += 1
        factor = momentum if momentum >= 0 else 1.0 / group_batches[g]
        correction = count / (count - 1)
        for c in range(channels):
            group_mean[g, c] += factor * (stats[g, c] - group_mean[g, c])
            group_var[g, c] += factor * (stats[num_groups + g, c] * correction - group_var[g, c])


def _output_map(weight, bias, affine, in_batch_units, batch_mean, batch_var, eps, channels):  # noqa: ANN001, ANN202
    """``u -> u * factor + offset`` after mixing, in float64 (:func:`~groupmixnorm.nn._core.output_map`)."""
    factor = np.ones(channels)
    offset = np.zeros(channels)
    for c in range(channels):
        if affine:
            factor[c] = weight[c]
            offset[c] = bias[c]
        if in_batch_units:
            factor[c] /= np.sqrt(batch_var[c] + eps)
            offset[c] -= batch_mean[c] * factor[c]
    return factor, offset


def _backward_impl(x, positions, groups, d_out, mixing, weight, bias, eps, in_batch_units, stats, samples, table,  # noqa: ANN001, ANN202, E501
                   moment_grads, d_x, need_x):
    num = x.shape[0]
    channels = x.shape[1] // positions
    num_groups = mixing.shape[0]
    affine = weight.shape[0] > 0
    total = num * positions
    mean = stats[:num_groups]
    batch_mean = stats[2 * num_groups].astype(np.float64)
    batch_var = stats[2 * num_groups + 1].astype(np.float64)
    mixed_mean = stats[2 * num_groups + 2].astype(np.float64)
    mixed_std = stats[2 * num_groups + 3].astype(np.float64)
    eligible = samples * positions >= 2
    batch_std = np.sqrt(batch_var + eps)
    factor, _ = _output_map(weight, bias, affine, in_batch_units, batch_mean, batch_var, eps, channels)
    spread = mixed_std * factor
    centre, scale, inverse_std = table  # read only: a retained graph runs this backward again

    # Pass 1: sum_g dy and sum_g dy * (x - mean_table[g]).
    d_shift = np.zeros((num_groups, channels))
    centred = np.zeros((num_groups, channels))
    for n in range(num):
        g = groups[n]
        row, grad, m, s0, s1 = x[n], d_out[n], centre[g], d_shift[g], centred[g]
        if positions == 1:
            for c in range(channels):
                dy = np.float64(grad[c])
                s0[c] += dy
                s1[c] += dy * np.float64(row[c] - m[c])
        else:
            for c in range(channels):
                start, stop = c * positions, (c + 1) * positions
                values, grads, mc = row[start:stop], grad[start:stop], m[c]
                a = 0.0
                b = 0.0
                for p in range(positions):
                    dy = np.float64(grads[p])
                    a += dy
                    b += dy * np.float64(values[p] - mc)
                s0[c] += a
                s1[c] += b

    # The chain rule through the (G, C) arithmetic (see _kernels._shared_mix_table_backward), in float64.
    d_level = np.zeros(channels)
    d_spread = np.zeros(channels)
    for g in range(num_groups):
        s0, s1, inv = d_shift[g], centred[g], inverse_std[g]
        for c in range(channels):
            s1[c] *= inv[c]  # now sum_g dy (x - m) / s
            d_level[c] += s0[c]
            d_spread[c] += s1[c]
    d_mixed_mean = d_level * factor
    d_mixed_std = d_spread * factor
    d_mixing = np.empty(num_groups, x.dtype)
    d_batch_mean = np.zeros(channels)
    d_batch_var = np.zeros(channels)
    for g in range(num_groups):
        w = np.float64(mixing[g])
        s0, s1, inv, ce = d_shift[g], centred[g], inverse_std[g], centre[g]
        total_g = 0.0
        for c in range(channels):
            total_g += np.float64(ce[c]) * d_mixed_mean[c] + d_mixed_std[c] / inv[c]
            sc = spread[c] * inv[c]
            d_mean_c = w * d_mixed_mean[c] - sc * s0[c]
            s1[c] = 0.5 * (w * d_mixed_std[c] - s1[c] * sc) * inv[c]  # now the gradient of the row's variance
            s0[c] = d_mean_c  # and of its mean
        d_mixing[g] = total_g
        if not eligible[g]:  # the group's row holds the batch's statistics
            for c in range(channels):
                d_batch_mean[c] += s0[c]
                d_batch_var[c] += s1[c]
                s0[c] = 0.0
                s1[c] = 0.0
    d_weight = np.empty(channels, x.dtype)
    d_bias = np.empty(channels, x.dtype)
    for c in range(channels):
        d_factor = mixed_std[c] * d_spread[c] + mixed_mean[c] * d_level[c]
        if in_batch_units:
            # factor = w / sigma_B, offset = b - mu_B * factor, sigma_B = sqrt(var_B + eps)
            d_factor = (d_factor - batch_mean[c] * d_level[c]) / batch_std[c]
            d_batch_mean[c] -= factor[c] * d_level[c]
            d_batch_var[c] -= 0.5 * d_factor * factor[c] / batch_std[c]
        d_weight[c] = d_factor
        d_bias[c] = d_level[c]
    if not need_x:
        return d_mixing, d_weight, d_bias
    d_mean_in, d_var_in, d_batch_mean_in, d_batch_var_in = moment_grads
    if d_mean_in.shape[0]:  # gradients that reach the moments themselves (the alignment penalties)
        for g in range(num_groups):
            s0, s1, dm, dv = d_shift[g], centred[g], d_mean_in[g], d_var_in[g]
            for c in range(channels):
                s0[c] += dm[c]
                s1[c] += dv[c]
        for c in range(channels):
            d_batch_mean[c] += d_batch_mean_in[c]
            d_batch_var[c] += d_batch_var_in[c]

    # Pass 2: dx = dy * scale[g] + slope[g] * (x - mean[g]) + offset[g], where the batch's terms
    # slope_B * (x - mean_B) = slope_B * (x - mean[g]) + slope_B * (mean[g] - mean_B) are folded into the
    # tables (exactly, and without cancellation when the mean is large relative to the spread).
    slope = np.empty((num_groups, channels), x.dtype)
    offset = np.empty((num_groups, channels), x.dtype)
    batch_slope = d_batch_var * (2.0 / total)
    batch_offset = d_batch_mean / total
    for g in range(num_groups):
        inverse = 1.0 / max(samples[g] * positions, 1)
        s0, s1, m, sl, o = d_shift[g], centred[g], mean[g], slope[g], offset[g]
        for c in range(channels):
            sl[c] = 2.0 * s1[c] * inverse + batch_slope[c]
            o[c] = s0[c] * inverse + batch_offset[c] + batch_slope[c] * (np.float64(m[c]) - batch_mean[c])
    for n in range(num):
        g = groups[n]
        row, grad, dest = x[n], d_out[n], d_x[n]
        s, sl, m, o = scale[g], slope[g], mean[g], offset[g]
        if positions == 1:
            for c in range(channels):
                dest[c] = grad[c] * s[c] + sl[c] * (row[c] - m[c]) + o[c]
        else:
            for c in range(channels):
                start, stop = c * positions, (c + 1) * positions
                values, grads, target = row[start:stop], grad[start:stop], dest[start:stop]
                sc, slc, mc, oc = s[c], sl[c], m[c], o[c]
                for p in range(positions):
                    target[p] = grads[p] * sc + slc * (values[p] - mc) + oc
    return d_mixing, d_weight, d_bias


if njit is not None:
    try:
        _output_map = njit(**_COMPILE_OPTIONS)(_output_map)
        _fold_running = njit(cache=True, nogil=True, error_model="numpy")(_fold_running)
        _forward_kernel = njit(**_COMPILE_OPTIONS)(_forward_impl)
        _backward_kernel = njit(**_COMPILE_OPTIONS)(_backward_impl)
    except Exception:  # noqa: BLE001 - numba present but unusable: the torch path
        AVAILABLE = False


