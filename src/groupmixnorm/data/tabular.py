"""Tabular datasets as arrays: features, binary labels and protected-group ids for train/val/test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split
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


#: What joins the values of several protected columns into one intersectional group name.
GROUP_JOINER = " & "


def intersect_groups(frame: pd.DataFrame) -> pd.Series:
    """One protected group per row from one or more columns of ``frame``.

    A single column is returned as it is. Several give intersectional groups: each combination of values
    is a group, named by the values as text joined with :data:`GROUP_JOINER` in column order (``"female &
    black"``); a row with a missing value in any of the columns gets a missing group.
    """
    if frame.shape[1] == 1:
        return frame.iloc[:, 0]
    columns = [frame.iloc[:, i].astype(str) for i in range(frame.shape[1])]
    joined = columns[0].str.cat(columns[1:], sep=GROUP_JOINER)  # vectorized: a row-wise join takes seconds on Adult
    return joined.where(frame.notna().all(axis=1))


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


def stratified_holdout(
    rows: np.ndarray, fraction: float, seed: int, y: np.ndarray, a: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into kept and held-out parts, stratified by label and group when every cell allows it."""
    cells = np.char.add(np.char.add(y.astype(str), "|"), a.astype(str))
    for strata in (cells, y, None):
        if strata is None or _splittable(strata, fraction):
            try:
                kept, held_out = train_test_split(rows, test_size=fraction, random_state=seed, stratify=strata)
            except ValueError:
                continue
            return np.sort(kept), np.sort(held_out)
    raise ValueError(f"too few rows ({len(rows)}) to hold out a share of {fraction:g}")


def _splittable(strata: np.ndarray, fraction: float) -> bool:
    """Whether every stratum has at least two rows and the held-out part can hold one row of each."""
    _, counts = np.unique(strata, return_counts=True)
    return counts.min() >= 2 and len(strata) * fraction >= len(counts) and len(strata) * (1 - fraction) >= len(counts)


#: The names of the splits in messages.
SPLIT_NAMES = {"train": "training", "val": "validation", "test": "test"}


def check_splits(data: TabularDataset) -> None:
    """Refuse, before any training, a dataset that training or its evaluation would trip over later.

    Every feature must be finite (then a NaN or infinity that appears while training can only be
    divergence), and the validation and test splits, on which every epoch is measured, must each hold two
    groups or more, each with positive and negative samples (a group absent from a split is allowed).

    Raises
    ------
    ValueError
        Naming the split, and the row and column or the group's value.
    """
    for key, name in SPLIT_NAMES.items():
        _check_finite_features(getattr(data, key), name, data.feature_names)
    for key in ("val", "test"):
        split, name = getattr(data, key), SPLIT_NAMES[key]
        present = np.unique(split.a)
        if len(present) < 2:
            only = data.group_names[int(present[0])] if len(present) else None
            totals = _rows_per_group(data)
            raise ValueError(f"the {name} split has only group {only!r} of {data.sensitive!r}, and the fairness gaps "
                             f"need two groups in it (rows per group in all splits: {totals}); merge or drop tiny "
                             "groups, or use more rows")
        for group in present:
            labels = np.unique(split.y[split.a == group])
            if len(labels) < 2:
                missing = "negative (label 0)" if labels[0] == 1 else "positive (label 1)"
                raise ValueError(f"group {data.group_names[int(group)]!r} of {data.sensitive!r} has no {missing} "
                                 f"samples in the {name} split, so its equal-opportunity and equalized-odds gaps are "
                                 "undefined; merge it with another group, or drop its rows")


def _check_finite_features(split: Split, name: str, feature_names: list[str]) -> None:
    # One float64 sum finds any NaN or infinity without a boolean copy of a large image array.
    if len(split) == 0 or np.isfinite(split.X.sum(dtype=np.float64)):
        return
    flat = split.X.reshape(len(split), -1)
    row = next(i for i in range(len(flat)) if not np.isfinite(flat[i]).all())
    column = int(np.flatnonzero(~np.isfinite(flat[row]))[0])
    label = f" ({feature_names[column]!r})" if column < len(feature_names) else ""
    raise ValueError(f"the {name} split's features hold NaN or infinity, first at row index {row}, column index "
                     f"{column}{label}; clean or impute the data before training")


def _rows_per_group(data: TabularDataset) -> dict[str, int]:
    counts = sum(np.bincount(split.a, minlength=data.num_groups) for split in (data.train, data.val, data.test))
    return {name: int(count) for name, count in zip(data.group_names, counts)}
