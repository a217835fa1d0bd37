"""Model builders whose normalization layer and its placement are parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from groupmixnorm.nn import GroupMixNorm1d

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
    layers: list[nn.Module] = []
    width = in_features
    for index, out in enumerate(hidden):
        layers.append(nn.Linear(width, out))
        if norm != "none" and index in normalized:
            layers.append(_norm_layer(norm, out, num_groups, norm_options or {}))
        layers.append(nn.ReLU())
        width = out
    if norm != "none" and HEAD in extra:
        layers.append(_norm_layer(norm, width, num_groups, norm_options or {}))
    layers.append(nn.Linear(width, 1))
    if norm != "none" and LOGIT in extra:
        layers.append(_norm_layer(norm, 1, num_groups, norm_options or {}))
    return nn.Sequential(*layers)


def _norm_layer(norm: NormKind, width: int, num_groups: int | None, options: dict[str, Any]) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm1d(width)
    return GroupMixNorm1d(width, num_groups=num_groups, **options)


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
