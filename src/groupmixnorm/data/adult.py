"""UCI Adult ("Census Income"), bundled with the package; see ``files/PROVENANCE.md``."""

from __future__ import annotations

import functools
import gzip
import io
from collections.abc import Callable
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from groupmixnorm.data.tabular import TabularDataset, encode_groups, intersect_groups, make_preprocessor, to_split

ADULT_COLUMNS: list[str] = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country", "income",
]
NUMERIC_COLUMNS = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
LABEL_COLUMN = "income"
POSITIVE_LABEL = ">50K"
# Group ids are positions in these sorted lists, so they never depend on which rows a split holds.
SENSITIVE_GROUPS: dict[str, list[str]] = {
    "sex": sorted(["Female", "Male"]),
    "race": sorted(["Amer-Indian-Eskimo", "Asian-Pac-Islander", "Black", "Other", "White"]),
}
#: Intersectional groups: every (sex, race) pair, named "Female & Black" and so on.
INTERSECTION = "sex*race"
SENSITIVE_GROUPS[INTERSECTION] = [f"{s} & {r}" for s in SENSITIVE_GROUPS["sex"] for r in SENSITIVE_GROUPS["race"]]
#: The raw columns behind each protected attribute (left out of the inputs unless asked for).
SENSITIVE_COLUMNS = {"sex": ["sex"], "race": ["race"], INTERSECTION: ["sex", "race"]}
PROTOCOLS = ("official", "fairmixup")


def bundled_file(name: str) -> Traversable:
    """The packaged data file ``name`` (never anything outside the installed package)."""
    return resources.files("groupmixnorm.data").joinpath("files", name)


def read_adult_frame(split: Literal["train", "test"]) -> pd.DataFrame:
    """Read the raw rows of one official Adult file.

    Parameters
    ----------
    split : {"train", "test"}
        ``"train"`` reads ``adult.data`` (32,561 rows), ``"test"`` reads ``adult.test`` (16,281 rows; its
        leading marker line is skipped).

    Returns
    -------
    pandas.DataFrame
        One row per person with the columns :data:`ADULT_COLUMNS`: strings stripped, ``?`` as NaN, numerics
        as integers, and ``income`` normalized to ``"<=50K"`` / ``">50K"`` (the test file's trailing dots
        removed).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _parsed_adult_file(split).copy()


@functools.lru_cache(maxsize=2)
def _parsed_adult_file(split: str) -> pd.DataFrame:
    """Parse a bundled file once per process (a bench loads the data for every run); callers get copies."""
    raw = bundled_file("adult.data.gz" if split == "train" else "adult.test.gz").read_bytes()
    frame = pd.read_csv(
        io.BytesIO(gzip.decompress(raw)), header=None, names=ADULT_COLUMNS, sep=",", skipinitialspace=True,
        na_values="?", skiprows=1 if split == "test" else 0, skip_blank_lines=True,
    )
    frame[LABEL_COLUMN] = frame[LABEL_COLUMN].str.rstrip(".")
    return frame.dropna(subset=[LABEL_COLUMN]).reset_index(drop=True)


def load_adult(
    sensitive: str = "sex",
    protocol: str = "official",
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    include_sensitive: bool = False,
    quantize: bool = False,
) -> TabularDataset:
    """Load UCI Adult as arrays, ready to train on.

    Parameters
    ----------
    sensitive : {"sex", "race", "sex*race"}
        Protected attribute; ``"sex*race"`` gives the ten intersectional groups ("Female & Black", ...). Group ids follow the sorted value names: ``"sex"`` gives
        ``["Female", "Male"]``; ``"race"`` gives ``["Amer-Indian-Eskimo", "Asian-Pac-Islander", "Black",
        "Other", "White"]``. ``group_names[i]`` is the raw value of group id ``i``.
    protocol : {"official", "fairmixup"}
        ``"official"``: the UCI train file, less a validation part of ``val_fraction`` (stratified by label
        and group), and the UCI test file; no rows dropped, missing categories imputed with the most frequent
        training value. ``"fairmixup"``: the protocol of Fair Mixup's public Adult experiment: both files
        merged, rows with a missing occupation or native country dropped, and a shuffled 60/20/20
        train/validation/test split.
    seed : int
        Seed of the validation draw (``"official"``) or of the whole split (``"fairmixup"``).
    val_fraction : float
        Share of the official training file held out for validation, in ``(0, 0.5]``. Only used by the
        ``"official"`` protocol.
    include_sensitive : bool
        Keep the protected attribute among the inputs (it is left out by default).
    quantize : bool
        ``"fairmixup"`` only. Reproduces a quirk of that code and is not recommended: every continuous
        column is cut with the 10 equal-width bins computed for (standardized) training age and one-hot
        encoded, so heavy-tailed columns such as capital gain fall almost entirely in one bin.

    Returns
    -------
    TabularDataset
        Float32 features, 0/1 labels (1 for ``>50K``) and group ids per split, with the fitted
        preprocessor.

    Raises
    ------
    ValueError
        For an unknown ``sensitive`` or ``protocol``, ``val_fraction`` outside ``(0, 0.5]``, or ``quantize``
        with a protocol other than ``"fairmixup"``.

    Notes
    -----
    Numerics are standardized and categoricals one-hot encoded with statistics of the training part only;
    categories unseen in training encode as all zeros.
    """
    _check_options(sensitive, protocol, val_fraction, quantize)
    if protocol == "official":
        train, val = _split(_with_intersection(read_adult_frame("train")), val_fraction, seed, strata=_strata(sensitive))
        test = _with_intersection(read_adult_frame("test"))
    else:
        train, val, test = (_with_intersection(frame) for frame in _fairmixup_frames(seed))

    hidden = set() if include_sensitive else set(SENSITIVE_COLUMNS[sensitive])
    features = [c for c in ADULT_COLUMNS if c != LABEL_COLUMN and c not in hidden]
    numeric = [c for c in NUMERIC_COLUMNS if c in features]
    categorical = [c for c in features if c not in numeric]
    if quantize:
        train, val, test = _quantize_like_fairmixup(train, val, test, numeric)
        numeric, categorical = [], features
    preprocessor = make_preprocessor(numeric, categorical).fit(train[features])
    groups = SENSITIVE_GROUPS[sensitive]
    splits = [
        to_split(frame[features], preprocessor, _labels(frame), encode_groups(frame[sensitive], groups))
        for frame in (train, val, test)
    ]
    return TabularDataset(
        name="adult", train=splits[0], val=splits[1], test=splits[2],
        feature_names=list(preprocessor.get_feature_names_out()), sensitive=sensitive, group_names=list(groups),
        protocol=protocol, preprocessor=preprocessor,
    )


def _check_options(sensitive: str, protocol: str, val_fraction: float, quantize: bool) -> None:
    if sensitive not in SENSITIVE_GROUPS:
        raise ValueError(f"unknown sensitive attribute {sensitive!r} for adult; choose from {sorted(SENSITIVE_GROUPS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {list(PROTOCOLS)}")
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if quantize and protocol != "fairmixup":
        raise ValueError("quantize=True reproduces the fairmixup protocol's binning; use protocol='fairmixup'")


def _fairmixup_frames(seed: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    merged = pd.concat([read_adult_frame("train"), read_adult_frame("test")], ignore_index=True)
    merged = merged.dropna(subset=["occupation", "native-country"]).reset_index(drop=True)
    # A plain shuffled split, as in the reference code (no stratification).
    train, rest = _split(merged, 0.4, seed)
    val, test = _split(rest, 0.5, seed)
    return train, val, test


def _with_intersection(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(**{INTERSECTION: intersect_groups(frame[["sex", "race"]])})


def _labels(frame: pd.DataFrame) -> np.ndarray:
    return (frame[LABEL_COLUMN] == POSITIVE_LABEL).to_numpy(dtype=np.int64)


def _strata(sensitive: str) -> Callable[[pd.DataFrame], pd.Series]:
    return lambda frame: frame[LABEL_COLUMN].astype(str) + "|" + frame[sensitive].astype(str)


def _split(
    frame: pd.DataFrame,
    fraction: float,
    seed: int,
    strata: Callable[[pd.DataFrame], pd.Series] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Hold out ``fraction`` of the rows, stratified by ``strata(frame)`` when given."""
    kept, held_out = train_test_split(
        frame, test_size=fraction, random_state=seed, stratify=None if strata is None else strata(frame)
    )
    return kept.reset_index(drop=True), held_out.reset_index(drop=True)


def _quantize_like_fairmixup(
    train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, numeric: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Replace each numeric column by its bin index (as a category) under the bins of training age.

    Like the reference, the binning happens after standardization, and the age edges are (deliberately,
    to reproduce the quirk) reused for every other continuous column.
    """
    scaler = StandardScaler().fit(train[numeric].to_numpy(dtype=float))
    age = numeric.index("age")
    edges = np.histogram_bin_edges(scaler.transform(train[numeric].to_numpy(dtype=float))[:, age], bins=10)
    frames = []
    for frame in (train, val, test):
        scaled = scaler.transform(frame[numeric].to_numpy(dtype=float))
        frame = frame.copy()
        for index, column in enumerate(numeric):
            # Inner edges only: values below/above the training range land in the first/last bin.
            frame[column] = np.digitize(scaled[:, index], edges[1:-1]).astype(str)
        frames.append(frame)
    return frames[0], frames[1], frames[2]


__all__ = ["ADULT_COLUMNS", "load_adult", "read_adult_frame"]
