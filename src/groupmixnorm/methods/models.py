"""Model builders whose normalization layer and its placement are parameters: an MLP for tables, a small
CNN for images, and :func:`build_network`, which picks one from a :class:`ModelSpec`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from torch import nn

from groupmixnorm.nn import GroupMixNorm1d, GroupMixNorm2d

if TYPE_CHECKING:
    from groupmixnorm.methods.base import ModelSpec

NormKind = Literal["none", "batchnorm", "groupmixnorm"]
NORM_KINDS = ("none", "batchnorm", "groupmixnorm")
PLACEMENTS = ("all", "first", "last", "head", "logit")
HEAD, LOGIT = "head", "logit"


def build_mlp(
    in_features: int,
    hidden: Sequence[int] = (200, 200),
    *,
    norm: NormKind = "none",
    placement: str = "all",
    num_groups: int | None = None,
    norm_options: dict[str, Any] | None = None,
) -> nn.Sequential:
    """A ReLU multilayer perceptron with one logit output.

    Each hidden block is ``Linear -> [norm] -> ReLU``. ``placement`` says where the normalization layer
    goes: ``"all"`` hidden blocks, the ``"first"`` or ``"last"`` block, ``"head"`` (after the last ReLU, so
    that the output layer reads normalized features), ``"logit"`` (one channel: the output itself), or a
    comma-separated list of those such as ``"0,1"`` or ``"1,head,logit"``.
    """
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
    if not hidden:
        raise ValueError("hidden must name at least one layer width")
    normalized, extra = _placement_indices(placement, len(hidden))
    absorbs = _absorbs_bias(norm, norm_options or {})
    layers: list[nn.Module] = []
    width = in_features
    for index, out in enumerate(hidden):
        layers.append(nn.Linear(width, out, bias=not (absorbs and index in normalized)))
        if norm != "none" and index in normalized:
            layers.append(_norm_layer(norm, out, num_groups, norm_options or {}))
        layers.append(nn.ReLU())
        width = out
    if norm != "none" and HEAD in extra:
        layers.append(_norm_layer(norm, width, num_groups, norm_options or {}))
    layers.append(nn.Linear(width, 1, bias=not (absorbs and LOGIT in extra)))
    if norm != "none" and LOGIT in extra:
        layers.append(_norm_layer(norm, 1, num_groups, norm_options or {}))
    return nn.Sequential(*layers)


def build_network(
    spec: ModelSpec,
    *,
    norm: NormKind = "none",
    placement: str = "all",
    norm_options: dict[str, Any] | None = None,
) -> nn.Sequential:
    """The model for ``spec``: :func:`build_cnn` for image inputs ``(C, H, W)`` with ``spec.hidden`` as the
    channels of its convolution blocks, else :func:`build_mlp` with ``spec.hidden`` as its widths."""
    options = {"norm": norm, "placement": placement, "num_groups": spec.num_groups, "norm_options": norm_options}
    if spec.is_image:
        return build_cnn(spec.input_shape, spec.hidden, **options)
    return build_mlp(spec.in_features, spec.hidden, **options)


def build_cnn(
    input_shape: Sequence[int],
    channels: Sequence[int] = (16, 32),
    *,
    norm: NormKind = "none",
    placement: str = "all",
    num_groups: int | None = None,
    norm_options: dict[str, Any] | None = None,
) -> nn.Sequential:
    """A small convolutional network with one logit output, for ``(N, C, H, W)`` images of ``input_shape``.

    Each block is ``Conv2d(3x3) -> [norm] -> ReLU -> MaxPool2d(2)`` (no pooling once the image is one pixel
    wide); then global average pooling and a linear logit. ``placement`` works as in :func:`build_mlp`:
    block indices (or ``"all"``, ``"first"``, ``"last"``) get a ``BatchNorm2d`` / ``GroupMixNorm2d`` after
    their convolution; ``"head"`` puts a 1d layer on the pooled features, ``"logit"`` one on the output.
    """
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width), got {tuple(input_shape)}")
    if not channels:
        raise ValueError("channels must name at least one convolution block")
    normalized, extra = _placement_indices(placement, len(channels))
    absorbs = _absorbs_bias(norm, norm_options or {})
    layers: list[nn.Module] = []
    width, size = input_shape[0], min(input_shape[1:])
    for index, out in enumerate(channels):
        layers.append(nn.Conv2d(width, out, kernel_size=3, padding=1, bias=not (absorbs and index in normalized)))
        if norm != "none" and index in normalized:
            layers.append(_norm_layer(norm, out, num_groups, norm_options or {}, image=True))
        layers.append(nn.ReLU())
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        width = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    if norm != "none" and HEAD in extra:
        layers.append(_norm_layer(norm, width, num_groups, norm_options or {}))
    layers.append(nn.Linear(width, 1, bias=not (absorbs and LOGIT in extra)))
    if norm != "none" and LOGIT in extra:
        layers.append(_norm_layer(norm, 1, num_groups, norm_options or {}))
    return nn.Sequential(*layers)


def _absorbs_bias(norm: NormKind, options: dict[str, Any]) -> bool:
    """Whether the normalization layer removes any per-channel shift of its input in training, so that a
    bias just before it has a gradient that is zero in exact arithmetic.

    Such a bias is left out (as is usual before batch normalization): Adam rescales its rounding-noise
    gradient into steps of size ``lr`` in random directions, which moves the running statistics and makes
    runs that differ only in summation order (one process against several) drift apart. GroupMixNorm
    with ``output_scale="mixed"`` keeps the input's units, so the shift passes through and the bias stays.
    """
    if norm == "batchnorm":
        return True
    return norm == "groupmixnorm" and options.get("output_scale", "batch") == "batch"


def _norm_layer(
    norm: NormKind, width: int, num_groups: int | None, options: dict[str, Any], *, image: bool = False
) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm2d(width) if image else nn.BatchNorm1d(width)
    layer = GroupMixNorm2d if image else GroupMixNorm1d
    return layer(width, num_groups=num_groups, **options)


def _placement_indices(placement: str, depth: int) -> tuple[set[int], set[str]]:
    """The hidden-block indices that get the layer, and which of ``head`` / ``logit`` get it too."""
    named = {"all": set(range(depth)), "first": {0}, "last": {depth - 1}}
    if placement in named:
        return named[placement], set()
    parts = [part.strip() for part in placement.split(",")]
    extra = {part for part in parts if part in (HEAD, LOGIT)}
    try:
        indices = {int(part) for part in parts if part not in extra}
    except ValueError:
        raise ValueError(
            f"placement must be one of {PLACEMENTS} or a comma-separated list of block indices, "
            f"'head' and 'logit', got {placement!r}"
        ) from None
    if not indices <= set(range(depth)):
        raise ValueError(f"placement {placement!r} names blocks outside 0..{depth - 1}")
    return indices, extra
