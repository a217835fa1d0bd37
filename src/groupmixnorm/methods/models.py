"""Model builders whose normalization layer and its placement are parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from torch import nn

from groupmixnorm.nn import GroupMixNorm1d

NormKind = Literal["none", "batchnorm", "groupmixnorm"]
NORM_KINDS = ("none", "batchnorm", "groupmixnorm")
PLACEMENTS = ("all", "first", "last")


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

    Each hidden block is ``Linear -> [norm] -> ReLU``. ``placement`` says which hidden blocks get the
    normalization layer: ``"all"``, ``"first"``, ``"last"`` (just before the head), or a comma-separated list
    of block indices such as ``"0,1"``.
    """
    if norm not in NORM_KINDS:
        raise ValueError(f"norm must be one of {NORM_KINDS}, got {norm!r}")
    if not hidden:
        raise ValueError("hidden must name at least one layer width")
    normalized = _placement_indices(placement, len(hidden))
    layers: list[nn.Module] = []
    width = in_features
    for index, out in enumerate(hidden):
        layers.append(nn.Linear(width, out))
        if norm != "none" and index in normalized:
            layers.append(_norm_layer(norm, out, num_groups, norm_options or {}))
        layers.append(nn.ReLU())
        width = out
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


def _norm_layer(norm: NormKind, width: int, num_groups: int | None, options: dict[str, Any]) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm1d(width)
    return GroupMixNorm1d(width, num_groups=num_groups, **options)


def _placement_indices(placement: str, depth: int) -> set[int]:
    if placement == "all":
        return set(range(depth))
    if placement == "first":
        return {0}
    if placement == "last":
        return {depth - 1}
    try:
        indices = {int(part) for part in placement.split(",")}
    except ValueError:
        raise ValueError(
            f"placement must be one of {PLACEMENTS} or a comma-separated list of block indices, got {placement!r}"
        ) from None
    if not indices <= set(range(depth)):
        raise ValueError(f"placement {placement!r} names blocks outside 0..{depth - 1}")
    return indices
