"""Any table as a dataset: a CSV file with a binary label and a protected attribute.

The columns are typed from the data (numeric dtypes are standardized, everything else is one-hot encoded),
rows with a missing value are dropped (or refused with ``strict=True``), and the rows are split into
train, validation and test, stratified by label and group, with a seed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.tree import DecisionTreeClassifier

from groupmixnorm.data.tabular import (
    TabularDataset, encode_groups, intersect_groups, make_preprocessor, stratified_holdout, to_split,
)

#: More distinct values than this in the protected column is almost surely a continuous column.
MAX_GROUPS = 20
#: Strings read as missing values, besides pandas' defaults ("", "NA", "NaN", ...): UCI files write "?".
MISSING_MARKERS = ("?",)


#: A feature that alone predicts the protected attribute with at least this balanced accuracy is reported.
LEAK_BALANCED_ACCURACY = 0.95
#: A column of distinct whole numbers or strings in a table of at least this many rows is reported as an ID.
MIN_ROWS_FOR_ID = 50
#: Groups with fewer rows than this make a leak estimate too noisy to report.
MIN_ROWS_PER_GROUP_FOR_LEAK = 10


class CSVError(ValueError):
    """A CSV that cannot be trained on as asked; the message names the file, column or value at fault."""


class DataWarning(UserWarning):
    """A table that can be trained on but probably should not be as it is: a column that encodes the
    protected attribute, or an identifier. The command line prints each as one line."""


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
        The protected attribute's column, with 2 to :data:`MAX_GROUPS` distinct values; or several columns,
        comma-separated (``"sex,race"``), for intersectional groups: each combination of values found is a
        group, named like ``"female & black"`` (:func:`~groupmixnorm.data.tabular.intersect_groups`), and
        2 to :data:`MAX_GROUPS` combinations are needed. These columns are not inputs of the model. Group
        ids follow the sorted names (as strings).
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
    columns = sensitive_columns(sensitive)
    features = _feature_columns(frame, label, columns, drop, source)
    _check_finite(frame, features, source)
    rows = len(frame)
    frame, dropped = _complete_rows(frame[[*features, label, *columns]], strict, source)
    try:
        y, positive_name = binary_labels(frame[label], positive, label)
        names = row_groups(frame, sensitive)
        groups = sorted(names.unique())
        _check_groups(groups, sensitive)
        a = encode_groups(names, groups)
        index = np.arange(len(frame))
        rest, test = stratified_holdout(index, test_size, seed, y, a)
        train, val = stratified_holdout(rest, val_fraction, seed, y[rest], a[rest])
    except ValueError as error:
        if not dropped.total:
            raise
        # The rows that are gone may be the cause (a label left with one value, say): say so.
        raise CSVError(f"{error}; note that {dropped.describe(rows)}") from None
    for message in [*column_warnings(frame, features, sensitive), *_unmeasured_groups(groups, a, val, test, sensitive)]:
        warnings.warn(message, DataWarning, stacklevel=2)
    numeric, categorical = type_columns(frame[features])
    preprocessor = make_preprocessor(numeric, categorical).fit(frame.iloc[train][features])
    splits = [to_split(frame.iloc[rows][features], preprocessor, y[rows], a[rows]) for rows in (train, val, test)]
    protocol = (f"csv {source.name}: positive {label}={positive_name}; {len(frame)} rows "
                f"({dropped.total} with missing values dropped); test {test_size:g}, validation {val_fraction:g} of "
                f"the rest, seed {seed}, stratified by label and group")
    return TabularDataset(
        name="csv", train=splits[0], val=splits[1], test=splits[2],
        feature_names=list(preprocessor.get_feature_names_out()), sensitive=",".join(columns), group_names=groups,
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
    """:func:`load_csv` under the option names of a run's spec (``csv``, ``label``, ``split_seed``, ..., as the
    ``train`` flags name them); this is how :func:`groupmixnorm.data.load_dataset` loads ``"csv"``."""
    if label is None or sensitive is None:
        raise CSVError(f"the CSV dataset {csv} needs label (the label column) and sensitive (the protected "
                       "column or columns, comma-separated)")
    if protocol != "official":
        raise CSVError(f"protocol {protocol!r} does not apply to the CSV dataset {csv} "
                       "(its split is set by test_size and split_seed)")
    return load_csv(csv, label=label, sensitive=sensitive, seed=split_seed, **options)  # type: ignore[arg-type]


def sensitive_columns(sensitive: str) -> list[str]:
    """The protected columns named by ``sensitive``: one column, or several separated by commas."""
    columns = [name.strip() for name in sensitive.split(",")]
    if not all(columns):
        raise CSVError(f"sensitive columns {sensitive!r}: an empty column name (comma-separated names like sex,race)")
    repeated = sorted({name for name in columns if columns.count(name) > 1})
    if repeated:
        raise CSVError(f"sensitive columns {sensitive!r} name {', '.join(map(repr, repeated))} more than once")
    return columns


def row_groups(frame: pd.DataFrame, sensitive: str) -> pd.Series:
    """Each row's protected group as text, from the column(s) ``sensitive`` names (see :func:`load_csv`)."""
    return intersect_groups(frame[sensitive_columns(sensitive)]).astype(str)


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
                           "name the positive class with the positive option")
        chosen = column == values[1]
        positive = _text(values[1])
    else:
        chosen = _matches(column, positive)
        if not chosen.any():
            shown = ", ".join(repr(_text(v)) for v in values[:10])
            raise CSVError(f"positive class {positive!r} is not a value of label column {name!r} (values: {shown})")
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


def _feature_columns(
    frame: pd.DataFrame, label: str, sensitive: Sequence[str], drop: Sequence[str], source: Path
) -> list[str]:
    """The input columns: all but the label, the protected column(s) and ``drop``; unknown names are errors."""
    for role, column in (("label", label), *(("sensitive", c) for c in sensitive), *(("drop", c) for c in drop)):
        if column not in frame.columns:
            raise CSVError(f"unknown {role} column {column!r} in {source}; its columns: {', '.join(frame.columns)}")
    if label in sensitive:
        raise CSVError(f"the label and the protected attribute are the same column {label!r}")
    if {label, *sensitive} & set(drop):
        raise CSVError("the drop option cannot name the label or the protected attribute")
    features = [c for c in frame.columns if c not in {label, *sensitive, *drop}]
    if not features:
        raise CSVError(f"{source} has no input columns left besides the label, the protected attribute and the dropped columns")
    return features


@dataclass(frozen=True)
class DroppedRows:
    """Rows dropped for missing values: how many, and how many had a gap in each column."""

    total: int
    per_column: dict[str, int]

    def describe(self, rows: int) -> str:
        """E.g. ``999 of 1000 rows were dropped for a missing value (999 in 'z'); drop a column ...``."""
        worst = sorted(self.per_column.items(), key=lambda item: -item[1])
        shown = ", ".join(f"{count} in {column!r}" for column, count in worst[:5]) + (", ..." if len(worst) > 5 else "")
        return (f"{self.total} of {rows} rows were dropped for a missing value ({shown}); drop a column that "
                "is mostly empty (the drop option), or fill it in")


def _complete_rows(frame: pd.DataFrame, strict: bool, source: Path) -> tuple[pd.DataFrame, DroppedRows]:
    """``frame`` without rows that have a missing value, and what was dropped."""
    gaps = frame.isna()
    missing = gaps.any(axis=1)
    dropped = DroppedRows(int(missing.sum()), {str(c): int(n) for c, n in gaps.sum().items() if n})
    if dropped.total and strict:
        raise CSVError(f"{dropped.total} row(s) of {source} have missing values (in {', '.join(dropped.per_column)}); "
                       "they are dropped unless the strict option is set")
    kept = frame[~missing].reset_index(drop=True)
    if kept.empty:
        raise CSVError(f"every row of {source} has a missing value: {dropped.describe(len(frame))}")
    return kept, dropped


def _check_finite(frame: pd.DataFrame, features: list[str], source: Path) -> None:
    """Refuse an infinite number in an input column (pandas reads ``inf`` as a number, which no scaler takes)."""
    for column in features:
        values = frame[column]
        if not pd.api.types.is_float_dtype(values):
            continue
        infinite = np.isinf(values.to_numpy())
        if infinite.any():
            row = int(np.flatnonzero(infinite)[0])
            raise CSVError(f"column {column!r} of {source} has an infinite value ({values.iloc[row]}) in row {row + 1} "
                           f"(counting rows after the header from 1; {int(infinite.sum())} such row(s) in all); "
                           "replace it with a number, or leave the cell empty to mark it missing")


def _check_groups(groups: list[str], sensitive: str) -> None:
    if len(sensitive_columns(sensitive)) > 1:
        what, values, remedy = f"sensitive columns {sensitive!r} have", "combinations of values", "use fewer columns"
    else:
        what, values, remedy = f"sensitive column {sensitive!r} has", "distinct values", "bin it into groups first"
    if len(groups) < 2:
        raise CSVError(f"{what} one value ({groups[0]!r}); fairness needs two groups or more")
    if len(groups) > MAX_GROUPS:
        raise CSVError(f"{what} {len(groups)} {values} (at most {MAX_GROUPS}); {remedy}")


def column_warnings(frame: pd.DataFrame, features: Sequence[str], sensitive: str) -> list[str]:
    """One message per input column that defeats the purpose of a fair model, in column order.

    ``sensitive`` names the protected column, or several comma-separated (their intersectional groups, as
    in :func:`load_csv`). Two rules, both cheap (one pass per column):

    - **Proxy of the protected attribute.** A column is reported when it alone predicts the group with a
      balanced accuracy (mean recall over groups) of at least :data:`LEAK_BALANCED_ACCURACY`. A categorical
      column predicts, for each row, the group most frequent among the other rows with the same value
      (relative to the group's size; leave-one-out, so that a value seen once, as in an identifier, predicts
      nothing); a numeric column is cut by a decision tree with at most two leaves per group, fitted on the
      column alone with balanced class weights. Not judged when a group has fewer than
      :data:`MIN_ROWS_PER_GROUP_FOR_LEAK` rows.
    - **Identifier.** A column whose values are all distinct, and are strings or whole numbers, in a table of
      at least :data:`MIN_ROWS_FOR_ID` rows (distinct fractional numbers are measurements, not IDs).
    """
    groups = row_groups(frame, sensitive).to_numpy()
    _, counts = np.unique(groups, return_counts=True)
    judge_leaks = len(counts) >= 2 and counts.min() >= MIN_ROWS_PER_GROUP_FOR_LEAK
    messages = []
    for column in features:
        values = frame[column]
        if judge_leaks:
            score = _proxy_balanced_accuracy(values, groups)
            if score >= LEAK_BALANCED_ACCURACY:
                messages.append(f"column {column!r} alone predicts the protected attribute {sensitive!r} (balanced "
                                f"accuracy {score:.2f}), so a model can recover {sensitive!r} from it; drop {column!r} "
                                "(the drop option) unless it must stay")
        if _looks_like_an_id(values):
            messages.append(f"column {column!r} looks like an identifier (all {len(values)} values distinct), which "
                            f"a model can only memorize; drop it (the drop option)")
    return messages


def _proxy_balanced_accuracy(values: pd.Series, groups: np.ndarray) -> float:
    """Balanced accuracy of the simple single-column predictor of ``groups`` that :func:`column_warnings` describes."""
    names, truth = np.unique(groups, return_inverse=True)
    sizes = np.bincount(truth)
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        tree = DecisionTreeClassifier(max_leaf_nodes=2 * len(names), class_weight="balanced", random_state=0)
        column = values.to_numpy(dtype=np.float64).reshape(-1, 1)
        predicted = tree.fit(column, truth).predict(column)
    else:
        codes = pd.factorize(values.astype(str))[0]
        table = np.zeros((codes.max() + 1, len(names)), dtype=np.float64)
        np.add.at(table, (codes, truth), 1.0)
        others = table[codes]
        others[np.arange(len(codes)), truth] -= 1.0  # leave the row itself out
        # Shares of each group, not counts, so that a large group does not take every shared value; a value
        # seen only in this row (all zeros) predicts group 0, no better than chance.
        predicted = np.argmax(others / sizes, axis=1)
    return float(np.mean([np.mean(predicted[truth == g] == g) for g in range(len(names))]))


def _unmeasured_groups(
    groups: list[str], a: np.ndarray, val: np.ndarray, test: np.ndarray, sensitive: str
) -> list[str]:
    """A message per group too small to reach the validation or test split, whose gaps are then never measured."""
    messages = []
    for index, name in enumerate(groups):
        absent = [split for split, rows in (("validation", val), ("test", test)) if not np.any(a[rows] == index)]
        if absent:
            messages.append(f"group {name!r} of {sensitive!r} has {int(np.sum(a == index))} row(s), none in the "
                            f"{' and '.join(absent)} split, so no gap measures it; merge it with another group")
    return messages


def _looks_like_an_id(values: pd.Series) -> bool:
    if len(values) < MIN_ROWS_FOR_ID or values.nunique() != len(values) or pd.api.types.is_bool_dtype(values):
        return False
    if pd.api.types.is_float_dtype(values):
        return bool(np.all(np.mod(values.to_numpy(), 1) == 0))
    return True
