"""Datasets as arrays: bundled UCI Adult, with protocols, protected attributes and preprocessing; the bundled
tabular benchmark sets (German credit, COMPAS, credit default Taiwan, law school); colored and textured digits
(built from scikit-learn's bundled digits) and CelebA (from a local folder) as images."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from groupmixnorm.data.adult import ADULT_COLUMNS, load_adult, read_adult_frame
from groupmixnorm.data.benchmarks import BENCHMARKS, load_benchmark
from groupmixnorm.data.celeba import load_celeba
from groupmixnorm.data.colored_digits import load_colored_digits
from groupmixnorm.data.csv import load_csv, load_csv_dataset
from groupmixnorm.data.tabular import Split, TabularDataset
from groupmixnorm.data.textured_digits import load_textured_digits

_LOADERS: dict[str, Callable[..., TabularDataset]] = {
    "adult": load_adult, "colored-digits": load_colored_digits, "textured-digits": load_textured_digits,
    "celeba": load_celeba, "csv": load_csv_dataset,
    **{name: functools.partial(load_benchmark, name) for name in BENCHMARKS},
}
#: Datasets of images (``X`` of shape ``(n, C, H, W)``), on which the methods train a CNN.
IMAGE_DATASETS = ("colored-digits", "textured-digits", "celeba")


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
        Passed to the dataset's loader: :func:`load_adult`, :func:`load_benchmark` (``german``, ``compas``,
        ``credit``, ``law``), :func:`load_colored_digits`, :func:`load_textured_digits`, :func:`load_celeba` or
        :func:`~groupmixnorm.data.csv.load_csv_dataset`.

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


__all__ = ["ADULT_COLUMNS", "BENCHMARKS", "IMAGE_DATASETS", "Split", "TabularDataset", "available_datasets",
           "load_adult", "load_benchmark", "load_celeba", "load_colored_digits", "load_csv", "load_dataset",
           "load_textured_digits", "read_adult_frame"]
