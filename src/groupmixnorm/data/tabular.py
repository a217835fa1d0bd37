"""Tabular datasets as arrays: features, binary labels and protected-group ids for train/val/test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler


@dataclass(frozen=True)
class Split:
    """One split of a dataset.

    Attributes
    ----------
    X : numpy.ndarray
        Features, float32, shape ``(n, d)``; for image datasets normalized images of shape ``(n, C, H, W)``.
    y : numpy.ndarray
        Binary labels, int64 in ``{0, 1}``, shape ``(n,)``.
    a : numpy.ndarray
        Protected-group ids, int64 in ``0..G-1``, shape ``(n,)``.
    """

    X: np.ndarray
    y: np.ndarray
    a: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class TabularDataset:
    """A prepared dataset: three splits plus what is needed to interpret and extend them.

    Attributes
    ----------
    name : str
        Dataset name, e.g. ``"adult"``.
    train, val, test : Split
        The three splits.
    feature_names : list of str
        Names of the columns of ``X`` after one-hot encoding (``"<column>_<value>"`` for categories); empty
        for image datasets.
    sensitive : str
        The protected attribute, e.g. ``"sex"``.
    group_names : list of str
        ``group_names[i]`` is the raw attribute value of group id ``i``.
    protocol : str
        How the splits were made, e.g. ``"official"`` or ``"fairmixup"``.
    preprocessor : Any
        The fitted scikit-learn ``ColumnTransformer`` that turns raw rows into ``X``; ``None`` for images.
    """

    name: str
    train: Split
    val: Split
    test: Split
    feature_names: list[str]
    sensitive: str
    group_names: list[str]
    protocol: str
    preprocessor: Any

    @property
    def num_groups(self) -> int:
        """Number of protected groups ``G`` (ids ``0..G-1``)."""
        return len(self.group_names)

    @property
    def num_features(self) -> int:
        """Width ``d`` of the feature matrices; for images the number of values per image, ``C * H * W``."""
        return int(np.prod(self.train.X.shape[1:]))

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input: ``(d,)`` for feature rows, ``(C, H, W)`` for images."""
        return tuple(self.train.X.shape[1:])

    def describe(self) -> pd.DataFrame:
        """Summarize the splits.

        Returns
        -------
        pandas.DataFrame
            One row per split (``train``, ``val``, ``test``) with the columns ``n`` (rows),
            ``positive_rate`` and ``share_<group>`` for each group name.
        """
        rows = {}
        for name, split in (("train", self.train), ("val", self.val), ("test", self.test)):
            shares = np.bincount(split.a, minlength=self.num_groups) / len(split)
            rows[name] = {"n": len(split), "positive_rate": float(split.y.mean()),
                          **{f"share_{g}": float(v) for g, v in zip(self.group_names, shares)}}
        return pd.DataFrame.from_dict(rows, orient="index")


def make_preprocessor(numeric: list[str], categorical: list[str]) -> ColumnTransformer:
    """Standardize numerics; impute categoricals with their most frequent value, then one-hot encode."""
    categories = make_pipeline(
        SimpleImputer(strategy="most_frequent"),
        OneHotEncoder(handle_unknown="ignore", sparse_output=False),
    )
    return ColumnTransformer(
        [("numeric", StandardScaler(), numeric), ("categorical", categories, categorical)],
        verbose_feature_names_out=False,
    )


def encode_groups(values: pd.Series, names: list[str]) -> np.ndarray:
    """Map raw protected-attribute values to ids ``0..len(names)-1`` (ids follow ``names``)."""
    lookup = {name: index for index, name in enumerate(names)}
    unknown = sorted(set(values.dropna().unique()) - set(lookup))
    if unknown or values.isna().any():
        raise ValueError(f"protected attribute has values outside {names}: {unknown or ['missing']}")
    return values.map(lookup).to_numpy(dtype=np.int64)


def to_split(frame: pd.DataFrame, preprocessor: ColumnTransformer, y: np.ndarray, a: np.ndarray) -> Split:
    """Transform raw rows with the fitted ``preprocessor`` and pack them with their labels and groups."""
    X = np.asarray(preprocessor.transform(frame), dtype=np.float32)
    return Split(X=X, y=y.astype(np.int64), a=a.astype(np.int64))
