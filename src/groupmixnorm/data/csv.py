"""Any table as a dataset: a CSV file with a binary label and a protected attribute.

The columns are typed from the data (numeric dtypes are standardized, everything else is one-hot encoded),
rows with a missing value are dropped (or refused with ``strict=True``), and the rows are split into
train, validation and test, stratified by label and group, with a seed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from groupmixnorm.data.tabular import TabularDataset, encode_groups, make_preprocessor, to_split

#: More distinct values than this in the protected column is almost surely a continuous column.
MAX_GROUPS = 20
#: Strings read as missing values, besides pandas' defaults ("", "NA", "NaN", ...): UCI files write "?".
MISSING_MARKERS = ("?",)


class CSVError(ValueError):
    """A CSV that cannot be trained on as asked; the message names the file, column or value at fault."""


def load_csv(
    path: str | os.PathLike,
    *,
    label: str,
    sensitive: str,
    positive: str | None = None,
    drop: Sequence[str] = (),
    test_size: float = 0.3,
    val_fraction: float = 0.2,
    seed: int = 0,
    strict: bool = False,
) -> TabularDataset:
    """Load a CSV file with a header row as a dataset to train on.

    Parameters
    ----------
    path : path-like
        The CSV file (comma-separated, a header row; ``?`` and empty cells are missing values).
    label : str
        The column to predict. It must hold two distinct values, unless ``positive`` names the positive
        class (every other value is then negative).
    sensitive : str
        The protected attribute's column, with 2 to :data:`MAX_GROUPS` distinct values. It is not an input
        of the model. Group ids follow the sorted values (as strings).
    positive : str, optional
        The label value that counts as positive (compared as text, or as a number for a numeric column).
        Default: the larger of the two values (``1`` of 0/1, ``yes`` of no/yes, ``>50K`` of <=50K/>50K).
    drop : sequence of str
        Columns left out of the inputs (identifiers, leaky columns).
    test_size : float
        Share of the rows held out for testing, in ``(0, 1)``.
    val_fraction : float
        Share of the remaining rows held out for validation, in ``(0, 1)``.
    seed : int
        Seed of both splits. Splits are stratified by label and group (by label alone, or not at all, when
        a cell is too small to be split).
    strict : bool
        Refuse rows with a missing value in a used column instead of dropping them.

    Returns
    -------
    TabularDataset
        Named ``"csv"``; ``protocol`` describes the split, the positive class and the rows dropped.

    Raises
    ------
    CSVError
        (a ``ValueError``) for a missing, empty or unreadable file, an unknown column, a label that is not
        binary (without ``positive``), a ``positive`` that is not a label value, a protected column with one
        value (or too many), missing values with ``strict``, or no rows or inputs left.
    """
    source = Path(path)
    _check_fractions(test_size, val_fraction)
    frame = read_table(source)
    features = _feature_columns(frame, label, sensitive, drop, source)
    frame, dropped = _complete_rows(frame[[*features, label, sensitive]], strict, source)
    y, positive_name = binary_labels(frame[label], positive, label)
    groups = sorted(frame[sensitive].astype(str).unique())
    _check_groups(groups, sensitive)
    a = encode_groups(frame[sensitive].astype(str), groups)
    numeric, categorical = type_columns(frame[features])

    index = np.arange(len(frame))
    rest, test = _holdout(index, test_size, seed, y, a)
    train, val = _holdout(rest, val_fraction, seed, y[rest], a[rest])
    preprocessor = make_preprocessor(numeric, categorical).fit(frame.iloc[train][features])
    splits = [to_split(frame.iloc[rows][features], preprocessor, y[rows], a[rows]) for rows in (train, val, test)]
    protocol = (f"csv {source.name}: positive {label}={positive_name}; {len(frame)} rows "
                f"({dropped} with missing values dropped); test {test_size:g}, validation {val_fraction:g} of the "
                f"rest, seed {seed}, stratified by label and group")
    return TabularDataset(
        name="csv", train=splits[0], val=splits[1], test=splits[2],
        feature_names=list(preprocessor.get_feature_names_out()), sensitive=sensitive, group_names=groups,
        protocol=protocol, preprocessor=preprocessor,
    )


def load_csv_dataset(
    csv: str | os.PathLike,
    sensitive: str | None = None,
    protocol: str = "official",
    *,
    label: str | None = None,
    split_seed: int = 0,
    **options: object,
) -> TabularDataset:
    """:func:`load_csv` under the names of the ``train`` flags (``--csv``, ``--label``, ``--split-seed``, ...);
    this is how :func:`groupmixnorm.data.load_dataset` loads ``"csv"`` from a run's spec."""
    if label is None or sensitive is None:
        raise CSVError("--csv needs --label COLUMN and --sensitive COLUMN")
    if protocol != "official":
        raise CSVError(f"--protocol {protocol} does not apply to --csv "
                       "(its split is set by --test-size and --split-seed)")
    return load_csv(csv, label=label, sensitive=sensitive, seed=split_seed, **options)  # type: ignore[arg-type]


def read_table(source: Path) -> pd.DataFrame:
    """Read a CSV with a header row; :class:`CSVError` for a missing, empty or unreadable file."""
    if not source.is_file():
        raise CSVError(f"no CSV file at {source}")
    try:
        frame = pd.read_csv(source, skipinitialspace=True, na_values=list(MISSING_MARKERS))
    except pd.errors.EmptyDataError:
        raise CSVError(f"{source} is empty") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as error:
        raise CSVError(f"{source} is not a readable CSV: {error}") from None
    if frame.empty:
        raise CSVError(f"{source} has a header but no rows")
    frame.columns = [str(column).strip() for column in frame.columns]
    return frame


def type_columns(frame: pd.DataFrame) -> tuple[list[str], list[str]]:
    """Split the columns of ``frame`` into numeric (numbers, not booleans) and categorical (the rest)."""
    numeric = [c for c in frame.columns
               if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]
    return numeric, [c for c in frame.columns if c not in numeric]


def binary_labels(column: pd.Series, positive: str | None, name: str) -> tuple[np.ndarray, str]:
    """0/1 labels from a label column, and the positive value as text.

    Without ``positive`` the column must hold exactly two values, and the larger is positive.
    """
    values = sorted(column.unique())
    if positive is None:
        if len(values) != 2:
            shown = ", ".join(repr(_text(v)) for v in values[:5]) + (", ..." if len(values) > 5 else "")
            raise CSVError(f"label column {name!r} is not binary: it has {len(values)} distinct value(s) ({shown}); "
                           "pick the positive class with --positive VALUE")
        chosen = column == values[1]
        positive = _text(values[1])
    else:
        chosen = _matches(column, positive)
        if not chosen.any():
            shown = ", ".join(repr(_text(v)) for v in values[:10])
            raise CSVError(f"--positive {positive!r} is not a value of label column {name!r} (values: {shown})")
    y = chosen.to_numpy(dtype=np.int64)
    if y.min() == y.max():
        raise CSVError(f"label column {name!r} has only one class after choosing positive {positive!r}")
    return y, str(positive)


def _matches(column: pd.Series, positive: str) -> pd.Series:
    """Rows whose label equals ``positive``: as text, or as a number for a numeric column (``1`` = ``1.0``)."""
    as_text = column.astype(str).str.strip() == positive.strip()
    if as_text.any() or not pd.api.types.is_numeric_dtype(column):
        return as_text
    try:
        return column == float(positive)
    except ValueError:
        return as_text


def _text(value: object) -> str:
    """A label value as the user would type it (``1`` rather than ``1.0`` for whole numbers)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _check_fractions(test_size: float, val_fraction: float) -> None:
    if not 0.0 < test_size < 1.0:
        raise CSVError(f"test size must be in (0, 1), got {test_size}")
    if not 0.0 < val_fraction < 1.0:
        raise CSVError(f"validation fraction must be in (0, 1), got {val_fraction}")


def _feature_columns(frame: pd.DataFrame, label: str, sensitive: str, drop: Sequence[str], source: Path) -> list[str]:
    """The input columns: all but the label, the protected attribute and ``drop``; unknown names are errors."""
    for role, column in (("label", label), ("sensitive", sensitive), *(("drop", c) for c in drop)):
        if column not in frame.columns:
            raise CSVError(f"unknown {role} column {column!r} in {source}; its columns: {', '.join(frame.columns)}")
    if label == sensitive:
        raise CSVError(f"the label and the protected attribute are the same column {label!r}")
    if {label, sensitive} & set(drop):
        raise CSVError("--drop cannot drop the label or the protected attribute")
    features = [c for c in frame.columns if c not in {label, sensitive, *drop}]
    if not features:
        raise CSVError(f"{source} has no input columns left besides the label, the protected attribute and --drop")
    return features


def _complete_rows(frame: pd.DataFrame, strict: bool, source: Path) -> tuple[pd.DataFrame, int]:
    """``frame`` without rows that have a missing value, and how many were dropped."""
    missing = frame.isna().any(axis=1)
    count = int(missing.sum())
    if count and strict:
        columns = [c for c in frame.columns if frame[c].isna().any()]
        raise CSVError(f"{count} row(s) of {source} have missing values (in {', '.join(columns)}); "
                       "without --strict they are dropped")
    kept = frame[~missing].reset_index(drop=True)
    if kept.empty:
        raise CSVError(f"every row of {source} has a missing value")
    return kept, count


def _check_groups(groups: list[str], sensitive: str) -> None:
    if len(groups) < 2:
        raise CSVError(f"sensitive column {sensitive!r} has one value ({groups[0]!r}); "
                       "fairness needs two groups or more")
    if len(groups) > MAX_GROUPS:
        raise CSVError(f"sensitive column {sensitive!r} has {len(groups)} distinct values (at most {MAX_GROUPS}); "
                       "bin it into groups first")


def _holdout(
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
    raise CSVError(f"too few rows ({len(rows)}) to hold out a share of {fraction:g}")


def _splittable(strata: np.ndarray, fraction: float) -> bool:
    """Whether every stratum has at least two rows and the held-out part can hold one row of each."""
    _, counts = np.unique(strata, return_counts=True)
    return counts.min() >= 2 and len(strata) * fraction >= len(counts) and len(strata) * (1 - fraction) >= len(counts)
