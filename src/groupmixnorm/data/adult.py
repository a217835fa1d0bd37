"""UCI Adult ("Census Income"), bundled with the package; see ``files/PROVENANCE.md``."""

from __future__ import annotations

import gzip
import io
from importlib import resources
from typing import Literal

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from groupmixnorm.data.tabular import TabularDataset, encode_groups, make_preprocessor, to_split

ADULT_COLUMNS = [
    "age", "workclass", "fnlwgt", "education", "education-num", "marital-status", "occupation",
    "relationship", "race", "sex", "capital-gain", "capital-loss", "hours-per-week", "native-country", "income",
]
NUMERIC_COLUMNS = ["age", "fnlwgt", "education-num", "capital-gain", "capital-loss", "hours-per-week"]
LABEL_COLUMN = "income"
POSITIVE_LABEL = ">50K"
SENSITIVE_GROUPS = {
    "sex": ["Female", "Male"],
    "race": ["Amer-Indian-Eskimo", "Asian-Pac-Islander", "Black", "Other", "White"],
}
PROTOCOLS = ("official", "fairmixup")


def bundled_file(name: str) -> resources.abc.Traversable:
    """The packaged data file ``name`` (never anything outside the installed package)."""
    return resources.files("groupmixnorm.data").joinpath("files", name)


def read_adult_frame(split: Literal["train", "test"]) -> pd.DataFrame:
    """The raw rows of the official ``train`` or ``test`` file: strings stripped, ``?`` as NaN, and the
    label normalized to ``<=50K`` / ``>50K`` (the test file's trailing dots removed)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
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
    """Adult as arrays, ready to train on.

    Parameters
    ----------
    sensitive : {"sex", "race"}
        Protected attribute. Group ids follow the sorted value names (``Female=0, Male=1``; five races).
    protocol : {"official", "fairmixup"}
        ``"official"``: the UCI train file (less a stratified validation part of ``val_fraction``, drawn
        with ``seed``) and the UCI test file; missing categories imputed with the training mode.
        ``"fairmixup"``: the protocol of Fair Mixup's public Adult experiment: both files merged, rows with
        a missing occupation or native country dropped, a 60/20/20 split drawn with ``seed``.
    include_sensitive : bool
        Keep the protected attribute among the inputs (it is left out by default).
    quantize : bool
        ``"fairmixup"`` only: reproduce a quirk of that code, where every continuous column is cut into the
        10 equal-width bins computed for age and one-hot encoded. Offered to match their numbers; not
        recommended.

    Numerics are standardized and categoricals one-hot encoded with statistics of the training part only.
    """
    if sensitive not in SENSITIVE_GROUPS:
        raise ValueError(f"unknown sensitive attribute {sensitive!r} for adult; choose from {sorted(SENSITIVE_GROUPS)}")
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {PROTOCOLS}")
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
    if quantize and protocol != "fairmixup":
        raise ValueError("quantize=True reproduces the fairmixup protocol's binning; use protocol='fairmixup'")

    if protocol == "official":
        train, val = _stratified_split(read_adult_frame("train"), val_fraction, seed, sensitive)
        test = read_adult_frame("test")
    else:
        merged = pd.concat([read_adult_frame("train"), read_adult_frame("test")], ignore_index=True)
        merged = merged.dropna(subset=["occupation", "native-country"]).reset_index(drop=True)
        train, rest = _stratified_split(merged, 0.4, seed, sensitive)
        val, test = _stratified_split(rest, 0.5, seed, sensitive)

    features = [c for c in ADULT_COLUMNS if c != LABEL_COLUMN and (include_sensitive or c != sensitive)]
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
        feature_names=list(preprocessor.get_feature_names_out()), sensitive=sensitive, group_names=groups,
        protocol=protocol, preprocessor=preprocessor,
    )


def _labels(frame: pd.DataFrame) -> np.ndarray:
    return (frame[LABEL_COLUMN] == POSITIVE_LABEL).to_numpy(dtype=np.int64)


def _stratified_split(
    frame: pd.DataFrame, fraction: float, seed: int, sensitive: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    strata = frame[LABEL_COLUMN].astype(str) + "|" + frame[sensitive].astype(str)
    kept, held_out = train_test_split(frame, test_size=fraction, random_state=seed, stratify=strata)
    return kept.reset_index(drop=True), held_out.reset_index(drop=True)


def _quantize_like_fairmixup(
    train: pd.DataFrame, val: pd.DataFrame, test: pd.DataFrame, numeric: list[str]
) -> tuple[pd.DataFrame, ...]:
    edges = np.histogram_bin_edges(train["age"].to_numpy(dtype=float), bins=10)
    frames = []
    for frame in (train, val, test):
        frame = frame.copy()
        for column in numeric:
            frame[column] = np.digitize(frame[column].to_numpy(dtype=float), edges[1:-1]).astype(str)
        frames.append(frame)
    return tuple(frames)


__all__ = ["ADULT_COLUMNS", "load_adult", "read_adult_frame"]
