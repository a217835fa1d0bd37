"""Datasets as arrays: bundled UCI Adult, with protocols, protected attributes and preprocessing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from groupmixnorm.data.adult import ADULT_COLUMNS, load_adult, read_adult_frame
from groupmixnorm.data.tabular import Split, TabularDataset

_LOADERS: dict[str, Callable[..., TabularDataset]] = {"adult": load_adult}


def available_datasets() -> list[str]:
    """Return the names accepted by :func:`load_dataset`, sorted."""
    return sorted(_LOADERS)


def load_dataset(name: str, **options: Any) -> TabularDataset:
    """Load a dataset by name.

    Parameters
    ----------
    name : str
        One of :func:`available_datasets`.
    **options
        Passed to the dataset's loader (for ``"adult"``: :func:`load_adult`).

    Returns
    -------
    TabularDataset

    Raises
    ------
    ValueError
        If ``name`` is not a known dataset.
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(available_datasets())}")
    return _LOADERS[name](**options)


__all__ = ["ADULT_COLUMNS", "Split", "TabularDataset", "available_datasets", "load_adult", "load_dataset",
           "read_adult_frame"]
