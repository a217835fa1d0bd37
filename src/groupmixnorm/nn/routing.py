"""Routing the protected attribute to GroupMixNorm layers of a model that cannot pass it along.

``nn.Sequential`` and torchvision models call each child with one tensor. Inside
``with use_groups(a): model(x)`` every GroupMixNorm layer reads ``a`` for that call; outside the block
nothing is left behind. The blocks' values live in one :class:`threading.local` (threads stay separate,
nested blocks restore the outer value on exit), which ``torch.compile`` reads without a graph break, as it
cannot read a :class:`contextvars.ContextVar`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor


class AlignmentPenalties(list):
    """The penalties collected in one :func:`collect_alignment` block, and what they are conditioned on."""

    def __init__(self, condition: Tensor | None = None) -> None:
        super().__init__()
        self.condition = condition


class _Blocks(threading.local):
    """What the innermost blocks of this thread set: the group ids, the strata to mix within, the penalty
    collector, the reference flag."""

    def __init__(self) -> None:
        self.groups: Tensor | None = None
        self.strata: Tensor | None = None
        self.collector: AlignmentPenalties | None = None
        self.reference = False


_BLOCKS = _Blocks()


@contextmanager
def _setting(name: str, value: Any) -> Iterator[None]:
    """Set one of the thread's block values for the ``with`` block, and restore the outer one after it."""
    outer = getattr(_BLOCKS, name)
    setattr(_BLOCKS, name, value)
    try:
        yield
    finally:
        setattr(_BLOCKS, name, outer)


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
    with _setting("groups", groups):
        yield


def current_groups() -> Tensor | None:
    """The ids set by the innermost :func:`use_groups` block, or ``None`` outside any block."""
    return _BLOCKS.groups


@contextmanager
def mix_within(strata: Tensor | None) -> Iterator[None]:
    """Make every GroupMixNorm layer trained inside the block mix the groups' statistics only within each
    value of ``strata`` (an ``(N,)`` integer tensor, e.g. the labels).

    Each stratum's groups are normalized with their own statistics *in that stratum* and re-scaled with a
    Dirichlet mixture of them, drawn per stratum: within each label every group leaves with the same mean
    and deviation, while the labels keep their differences (demographic parity would erase them; this
    targets equalized odds). Evaluation is unchanged. ``mix_within(None)`` hides an outer value.

    Examples
    --------
    >>> with use_groups(a), mix_within(y.long()):
    ...     logits = model(x)
    """
    with _setting("strata", strata):
        yield


def current_strata() -> Tensor | None:
    """The strata set by the innermost :func:`mix_within` block, or ``None`` outside any block."""
    return _BLOCKS.strata


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
    with _setting("collector", penalties):
        yield penalties


def active_penalty_collector() -> AlignmentPenalties | None:
    """The list of the innermost :func:`collect_alignment` block, or ``None``."""
    return _BLOCKS.collector


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
    with _setting("reference", True):
        yield


def reference_requested() -> bool:
    """Whether layers should use the plain-autograd formulation: inside :func:`use_reference`, or while
    ``torch.compile`` traces (the fused autograd functions cannot be traced)."""
    import torch

    return torch.compiler.is_compiling() or _BLOCKS.reference
