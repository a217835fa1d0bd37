"""How many torch threads a workload uses: the one policy of the command line and the estimator.

Tabular models multiply small matrices, which run fastest on one thread: with two OpenMP threads on a
busy two-core machine an epoch was measured 3 to 70 times slower, because the threads spin while they wait
for each other. Convolutions on images gain from torch's own default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

#: Threads for tabular workloads unless the user says otherwise.
TABULAR_THREADS = 1


def default_threads(*, images: bool) -> int | None:
    """The thread count for a workload: ``TABULAR_THREADS`` for tables, ``None`` (torch's default) for images."""
    return None if images else TABULAR_THREADS


def check_threads(threads: int | None, name: str = "threads") -> None:
    """Refuse a thread count below one (``None`` means the default)."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{name} must be a whole number of at least 1 (or None for the default), got {threads!r}")


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads (``None``: leave torch's setting), then restore it."""
    check_threads(threads)
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
