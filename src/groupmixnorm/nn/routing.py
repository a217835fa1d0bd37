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


class AlignmentPenalties(list):
    """The penalties collected in one :func:`collect_alignment` block, and what they are conditioned on."""

    def __init__(self, condition: Tensor | None = None) -> None:
        super().__init__()
        self.condition = condition


_PENALTY_COLLECTOR: ContextVar[AlignmentPenalties | None] = ContextVar("groupmixnorm_penalties", default=None)


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


@contextmanager
def collect_alignment(condition: Tensor | None = None) -> Iterator[AlignmentPenalties]:
    """Collect the alignment penalty of every GroupMixNorm layer that runs in training inside the block.

    Each layer appends one differentiable scalar (see
    :func:`groupmixnorm.nn.functional.alignment_penalty`); add their sum, weighted, to the loss.
    With ``condition`` (an ``(N,)`` integer tensor, e.g. the labels) the groups are compared within each
    value of it and the penalties averaged with the values' shares: aligning conditionally on the label
    targets equalized odds instead of demographic parity.

    Examples
    --------
    >>> with use_groups(a), collect_alignment() as penalties:
    ...     logits = model(x)
    >>> loss = task_loss(logits, y) + weight * sum(penalties)
    """
    penalties = AlignmentPenalties(condition)
    token = _PENALTY_COLLECTOR.set(penalties)
    try:
        yield penalties
    finally:
        _PENALTY_COLLECTOR.reset(token)


def active_penalty_collector() -> AlignmentPenalties | None:
    """The list of the innermost :func:`collect_alignment` block, or ``None``."""
    return _PENALTY_COLLECTOR.get()


_USE_REFERENCE: ContextVar[bool] = ContextVar("groupmixnorm_reference", default=False)


@contextmanager
def use_reference() -> Iterator[None]:
    """Make every GroupMixNorm layer trained inside the block compute with the plain-autograd formulation
    (:func:`groupmixnorm.nn.functional.group_mix_norm`) instead of the fused one: the same values and
    random draws, slower, and differentiable twice (for gradient penalties, ``torch.autograd.grad(...,
    create_graph=True)``). Compiled graphs (``torch.compile``) use it on their own.

    Examples
    --------
    >>> with use_groups(a), use_reference():
    ...     (grad,) = torch.autograd.grad(model(x).sum(), x, create_graph=True)
    >>> grad.square().sum().backward()
    """
    token = _USE_REFERENCE.set(True)
    try:
        yield
    finally:
        _USE_REFERENCE.reset(token)


def reference_requested() -> bool:
    """Whether layers should use the plain-autograd formulation: inside :func:`use_reference`, or while
    ``torch.compile`` traces (the fused autograd functions cannot be traced)."""
    import torch

    # Compiling first: dynamo cannot trace ContextVar.get, and a graph break here would run this call
    # eagerly, where is_compiling() is False.
    return torch.compiler.is_compiling() or _USE_REFERENCE.get()
