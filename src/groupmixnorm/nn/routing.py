"""Routing the protected attribute to GroupMixNorm layers of a model that cannot pass it along.

``nn.Sequential`` and torchvision models call each child with one tensor. Inside
``with use_groups(a): model(x)`` every GroupMixNorm layer reads ``a`` for that call; outside the block
nothing is left behind (a :class:`contextvars.ContextVar`, so threads and nested blocks stay separate).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from torch import Tensor

_CURRENT_GROUPS: ContextVar[Tensor | None] = ContextVar("groupmixnorm_groups", default=None)


@contextmanager
def use_groups(groups: Tensor | None) -> Iterator[None]:
    """Make ``groups`` the protected-group ids of every GroupMixNorm layer called inside the block.

    An explicit ``groups=`` argument to a layer still wins. ``use_groups(None)`` hides any outer value,
    which is how a caller runs a model "without the attribute" inside an outer block.

    Examples
    --------
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), GroupMixNorm1d(8, num_groups=2))
    >>> with use_groups(a):
    ...     out = model(x)
    """
    token = _CURRENT_GROUPS.set(groups)
    try:
        yield
    finally:
        _CURRENT_GROUPS.reset(token)


def current_groups() -> Tensor | None:
    """The ids set by the innermost :func:`use_groups` block, or ``None`` outside any block."""
    return _CURRENT_GROUPS.get()
