"""Batch index streams for the training loop: random passes, or batches balanced by group (and label)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from groupmixnorm.methods.base import Sampling


def batch_indices(
    sampling: Sampling,
    y: Tensor,
    a: Tensor,
    *,
    batch_size: int,
    iterations: int | None,
    generator: torch.Generator,
) -> Iterator[Tensor]:
    """Yield the index tensors of one epoch.

    ``"random"``: a shuffled pass in batches of ``batch_size`` (or ``iterations`` random batches).
    ``"group"``: each batch holds ``batch_size`` samples of every group; ``"group_label"``: ``batch_size`` of
    every (group, label) cell, as the Fair Mixup protocol draws them for equalized odds. Within a batch a
    cell is drawn without replacement (with replacement only when the cell is smaller than asked).
    """
    if sampling == "random":
        yield from _random_batches(len(y), batch_size, iterations, generator)
        return
    cells = a * 2 + y.long() if sampling == "group_label" else a
    members = [torch.nonzero(cells == value).squeeze(1) for value in torch.unique(cells)]
    for _ in range(iterations or _default_iterations(len(y), batch_size, len(members))):
        yield torch.cat([_draw(member, batch_size, generator) for member in members])


def _random_batches(n: int, batch_size: int, iterations: int | None, generator: torch.Generator) -> Iterator[Tensor]:
    if iterations is None:
        yield from torch.randperm(n, generator=generator).split(batch_size)
        return
    for _ in range(iterations):
        yield torch.randint(0, n, (batch_size,), generator=generator)


def _draw(members: Tensor, count: int, generator: torch.Generator) -> Tensor:
    if len(members) >= count:
        return members[torch.randperm(len(members), generator=generator)[:count]]
    return members[torch.randint(0, len(members), (count,), generator=generator)]


def _default_iterations(n: int, batch_size: int, cells: int) -> int:
    return max(1, n // (batch_size * cells))
