"""The tabular benchmark sets bundled with the package: German credit, COMPAS, credit default (Taiwan) and law
school; see ``files/PROVENANCE.md`` for their sources.

Each is one entry of :data:`BENCHMARKS`: its file and reader, the label and its positive value, the protected
attributes (group names in id order, and the raw columns that encode each), the input columns, and the columns
that are never inputs, each with its reason. None of the files has an official test split, so every set is
split 60/20/20 into train, validation and test, stratified by label and group: the test part is drawn with
``split_seed`` and the validation part (from the rest) with ``seed``, so that neither moves with the seed of a
model's training.
"""

from __future__ import annotations

import functools
import gzip
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from groupmixnorm.data.adult import bundled_file
from groupmixnorm.data.tabular import TabularDataset, encode_groups, make_preprocessor, stratified_holdout, to_split

#: Share of the rows held out for testing, then share of the rest held out for validation (60/20/20).
TEST_FRACTION = 0.2
VAL_FRACTION = 0.25


@dataclass(frozen=True)
class Attribute:
    """A protected attribute of a benchmark set.

    Attributes
    ----------
    groups : tuple of str
        Group names; ``groups[i]`` is group id ``i``.
    values : callable
        Maps the parsed frame to each row's group name; rows outside every group get NaN and are dropped
        (COMPAS's two-group ``race`` keeps African-American and Caucasian rows only).
    columns : tuple of str
        The raw columns that encode the attribute; they are left out of the inputs when it is protected.
    """

    groups: tuple[str, ...]
    values: Callable[[pd.DataFrame], pd.Series]
    columns: tuple[str, ...]


@dataclass(frozen=True)
class Benchmark:
    """One bundled tabular set, as a table entry: everything its loader needs and its documentation states.

    Attributes
    ----------
    file : str
        The gzip-compressed file in ``files/``.
    read : callable
        Parses the decompressed bytes into a frame with named columns.
    label, positive : str, object
        The label column and its value that is ``y = 1``.
    meaning : str
        What ``y = 1`` means, for the ``protocol`` text.
    attributes : dict
        Protected attributes by name; the first is the default.
    numeric, categorical : tuple of str
        Candidate inputs: numerics are standardized, categoricals one-hot encoded. A protected attribute's
        ``columns`` are removed from them.
    left_out : dict
        Columns that are never inputs, each with the reason.
    keep : callable, optional
        A row filter applied after reading (COMPAS: ProPublica's), described by ``keep_note``.
    """

    file: str
    read: Callable[[bytes], pd.DataFrame]
    label: str
    positive: object
    meaning: str
    attributes: dict[str, Attribute]
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    left_out: dict[str, str]
    keep: Callable[[pd.DataFrame], pd.Series] | None = None
    keep_note: str = ""


def _read_csv(raw: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(raw))


# --- German credit ----------------------------------------------------------------------------------

#: Statlog German Credit's attributes A1..A20, then the label, under descriptive names.
GERMAN_COLUMNS = [
    "checking_status", "duration", "credit_history", "purpose", "credit_amount", "savings", "employment_since",
    "installment_rate", "personal_status_sex", "other_debtors", "residence_since", "property", "age",
    "other_installment_plans", "housing", "existing_credits", "job", "people_liable", "telephone",
    "foreign_worker", "credit_risk",
]
#: Codes of A9 (personal status and sex) by sex.
GERMAN_SEX = {"A91": "male", "A92": "female", "A93": "male", "A94": "male", "A95": "female"}


def _read_german(raw: bytes) -> pd.DataFrame:
    return pd.read_csv(io.BytesIO(raw), sep=" ", header=None, names=GERMAN_COLUMNS)


def _german_age(frame: pd.DataFrame) -> pd.Series:
    return pd.Series(np.where(frame["age"] <= 25, "<=25", ">25"), index=frame.index)


GERMAN = Benchmark(
    file="german.data.gz", read=_read_german, label="credit_risk", positive=1, meaning="good credit risk, favourable",
    attributes={
        "age": Attribute(("<=25", ">25"), _german_age, ("age",)),
        "sex": Attribute(("female", "male"), lambda f: f["personal_status_sex"].map(GERMAN_SEX),
                         ("personal_status_sex",)),
    },
    numeric=("duration", "credit_amount", "installment_rate", "residence_since", "age", "existing_credits",
             "people_liable"),
    categorical=("checking_status", "credit_history", "purpose", "savings", "employment_since", "other_debtors",
                 "property", "other_installment_plans", "housing", "job", "telephone", "foreign_worker"),
    left_out={"personal_status_sex": "A9 mixes marital status with sex and names sex exactly (A92, A95 female; "
                                     "A91, A93, A94 male): left out for every attribute, so that sex never enters "
                                     "the inputs through it"},
)

# --- COMPAS -----------------------------------------------------------------------------------------


def _propublica_filter(frame: pd.DataFrame) -> pd.Series:
    return ((frame["days_b_screening_arrest"].abs() <= 30) & (frame["is_recid"] != -1)
            & (frame["c_charge_degree"] != "O") & frame["score_text"].notna() & (frame["score_text"] != "N/A"))


def _left_out(reasons: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """``{reason: columns}`` turned into ``{column: reason}``."""
    return {column: reason for reason, columns in reasons.items() for column in columns}


COMPAS_RACES = ("African-American", "Asian", "Caucasian", "Hispanic", "Native American", "Other")
COMPAS = Benchmark(
    file="compas-scores-two-years.csv.gz", read=_read_csv, label="two_year_recid", positive=1,
    meaning="re-offended within two years; the gaps' selection is being flagged as a re-offender, unfavourable",
    attributes={
        "race": Attribute(("African-American", "Caucasian"),
                          lambda f: f["race"].where(f["race"].isin(["African-American", "Caucasian"])), ("race",)),
        "race6": Attribute(COMPAS_RACES, lambda f: f["race"], ("race",)),
        "sex": Attribute(("female", "male"), lambda f: f["sex"].map({"Female": "female", "Male": "male"}), ("sex",)),
    },
    numeric=("age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count"),
    categorical=("sex", "race", "c_charge_degree"),
    left_out=_left_out({
        "an identifier": ("id", "name", "first", "last", "c_case_number", "r_case_number", "vr_case_number"),
        "COMPAS's own output, the tool under audit": (
            "decile_score", "decile_score.1", "score_text", "v_decile_score", "v_score_text", "type_of_assessment",
            "v_type_of_assessment"),
        "the outcome, or recorded after the screening": (
            "is_recid", "r_charge_degree", "r_days_from_arrest", "r_offense_date", "r_charge_desc", "r_jail_in",
            "r_jail_out", "violent_recid", "is_violent_recid", "vr_charge_degree", "vr_offense_date",
            "vr_charge_desc", "in_custody", "out_custody", "start", "end", "event"),
        "a date or case bookkeeping, not a trait of the person": (
            "compas_screening_date", "screening_date", "v_screening_date", "days_b_screening_arrest", "c_jail_in",
            "c_jail_out", "c_offense_date", "c_arrest_date", "c_days_from_compas"),
        "free text with hundreds of values (the charge degree is kept)": ("c_charge_desc",),
        "redundant with age (date of birth, age bins)": ("dob", "age_cat"),
        "a duplicate of priors_count": ("priors_count.1",),
    }),
    keep=_propublica_filter,
    keep_note="ProPublica's filter: |days_b_screening_arrest| <= 30, is_recid != -1, c_charge_degree != 'O', "
              "score_text != 'N/A'",
)

# --- credit default (Taiwan) ------------------------------------------------------------------------

#: This copy codes SEX as 0 and 1 (UCI's 1 and 2): 0 = male (11,888 rows), 1 = female (18,112), as UCI's counts show.
CREDIT_SEX = {0: "male", 1: "female"}
CREDIT = Benchmark(
    file="credit_default.csv.gz", read=_read_csv, label="default_payment_next_month", positive=1,
    meaning="defaulted on the next month's payment; the gaps' selection is being flagged as a defaulter, unfavourable",
    attributes={"sex": Attribute(("female", "male"), lambda f: f["SEX"].map(CREDIT_SEX), ("SEX",))},
    # PAY_* (repayment status: -2 no use, -1 paid in full, 0 revolving, 1..8 months late) are ordered by lateness,
    # so they stay numeric; EDUCATION and MARRIAGE are unordered codes (with undocumented values) and one-hot.
    numeric=("LIMIT_BAL", "AGE", "PAY_0", "PAY_2", "PAY_3", "PAY_4", "PAY_5", "PAY_6",
             *(f"BILL_AMT{i}" for i in range(1, 7)), *(f"PAY_AMT{i}" for i in range(1, 7))),
    categorical=("SEX", "EDUCATION", "MARRIAGE"),
    left_out={"ID": "a row identifier"},
)

# --- law school -------------------------------------------------------------------------------------

#: Kusner et al.'s code reads sex 1 as female and 2 as male.
LAW_SEX = {1: "female", 2: "male"}


def _read_law(raw: bytes) -> pd.DataFrame:
    frame = _read_csv(raw)
    return frame.assign(sex=frame["sex"].map(LAW_SEX))


LAW = Benchmark(
    file="law_school.csv.gz", read=_read_law, label="pass_bar", positive=1,
    meaning="passed the bar exam on the first try, favourable",
    attributes={
        "race": Attribute(("White", "non-White"), lambda f: f["race"].where(f["race"] == "White", "non-White"),
                          ("race",)),
        "sex": Attribute(("female", "male"), lambda f: f["sex"], ("sex",)),
    },
    numeric=("LSAT", "UGPA"),
    categorical=("sex", "race"),
    left_out={"ZFYA": "the first-year law school grade: measured after admission, so unknown when the prediction "
                      "would be made, and a near-proxy of the label (Kusner et al.'s regression target)"},
)

#: The bundled benchmark sets by name.
BENCHMARKS: dict[str, Benchmark] = {"german": GERMAN, "compas": COMPAS, "credit": CREDIT, "law": LAW}


def benchmark_frame(name: str) -> pd.DataFrame:
    """The parsed rows of a benchmark set after its row filter (COMPAS: ProPublica's), as a copy."""
    return _parsed(_known(name)).copy()


@functools.lru_cache(maxsize=None)
def _parsed(name: str) -> pd.DataFrame:
    """Parse a bundled file once per process (a bench loads the data for every run); callers get copies."""
    spec = BENCHMARKS[name]
    frame = spec.read(gzip.decompress(bundled_file(spec.file).read_bytes()))
    if spec.keep is not None:
        frame = frame[spec.keep(frame)]
    return frame.reset_index(drop=True)


def _known(name: str) -> str:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark data set {name!r}; choose from {sorted(BENCHMARKS)}")
    return name


def _attribute(name: str, sensitive: str | None) -> tuple[str, Attribute]:
    spec = BENCHMARKS[name]
    sensitive = next(iter(spec.attributes)) if sensitive is None else sensitive
    if sensitive not in spec.attributes:
        raise ValueError(f"unknown sensitive attribute {sensitive!r} for {name}; choose from {list(spec.attributes)}")
    return sensitive, spec.attributes[sensitive]


@dataclass(frozen=True)
class _Rows:
    """The rows a loader trains on for one attribute, with their labels and group ids, and what was dropped."""

    frame: pd.DataFrame
    features: list[str]
    y: np.ndarray
    a: np.ndarray
    outside: int
    missing: int


def _rows(name: str, sensitive: str) -> _Rows:
    spec = BENCHMARKS[name]
    attribute = spec.attributes[sensitive]
    frame = benchmark_frame(name)
    groups = attribute.values(frame)
    inside = groups.notna().to_numpy()
    features = [c for c in (*spec.numeric, *spec.categorical) if c not in attribute.columns]
    complete = frame[[*features, spec.label]].notna().all(axis=1).to_numpy()
    kept = inside & complete
    frame = frame[kept].reset_index(drop=True)
    y = (frame[spec.label] == spec.positive).to_numpy(dtype=np.int64)
    a = encode_groups(groups[kept].reset_index(drop=True), list(attribute.groups))
    return _Rows(frame, features, y, a, outside=int((~inside).sum()), missing=int((inside & ~complete).sum()))


def split_indices(
    name: str, sensitive: str | None = None, *, seed: int = 0, split_seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row positions of the train, validation and test parts, among the rows kept for ``sensitive``.

    The test part (20 %) depends on ``split_seed`` only; the validation part (20 %, from the rest) on both seeds.
    Both are stratified by label and group.
    """
    sensitive, _ = _attribute(_known(name), sensitive)
    return _split(_rows(name, sensitive), seed, split_seed)


def _split(rows: _Rows, seed: int, split_seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rest, test = stratified_holdout(np.arange(len(rows.y)), TEST_FRACTION, split_seed, rows.y, rows.a)
    train, val = stratified_holdout(rest, VAL_FRACTION, seed, rows.y[rest], rows.a[rest])
    return train, val, test


def load_benchmark(
    name: str, sensitive: str | None = None, protocol: str = "official", *, seed: int = 0, split_seed: int = 0
) -> TabularDataset:
    """Load a bundled benchmark set as arrays, ready to train on.

    Parameters
    ----------
    name : {"german", "compas", "credit", "law"}
        The data set (see :data:`BENCHMARKS` and the README's "Data sets" table).
    sensitive : str, optional
        Protected attribute: ``"age"`` (<=25, >25) or ``"sex"`` for german; ``"race"`` (African-American,
        Caucasian; rows of other races dropped), ``"race6"`` (all six) or ``"sex"`` for compas; ``"sex"`` for
        credit; ``"race"`` (White, non-White) or ``"sex"`` for law. Default: the first of these. Its raw
        columns are not inputs.
    protocol : {"official"}
        The only split these sets have: seeded, stratified 60/20/20 (``"fairmixup"`` is Adult's alone).
    seed : int
        Seed of the validation draw from the rows outside the test part.
    split_seed : int
        Seed of the test part (the ``train --split-seed`` flag); it does not move with ``seed``.

    Returns
    -------
    TabularDataset
        Float32 features, 0/1 labels and group ids per split; ``protocol`` describes the rows kept, the
        positive class and the split. Numerics are standardized and categoricals one-hot encoded with
        statistics of the training part only.

    Raises
    ------
    ValueError
        For an unknown data set, attribute or protocol.
    """
    spec = BENCHMARKS[_known(name)]
    sensitive, attribute = _attribute(name, sensitive)
    if protocol != "official":
        raise ValueError(f"protocol {protocol!r} does not apply to {name} (its split is seeded and stratified "
                         "60/20/20; set it with --split-seed)")
    rows = _rows(name, sensitive)
    parts = _split(rows, seed, split_seed)
    features = rows.features
    numeric = [c for c in spec.numeric if c in features]
    preprocessor = make_preprocessor(numeric, [c for c in features if c not in numeric])
    preprocessor.fit(rows.frame.iloc[parts[0]][features])
    splits = [to_split(rows.frame.iloc[part][features], preprocessor, rows.y[part], rows.a[part]) for part in parts]
    return TabularDataset(
        name=name, train=splits[0], val=splits[1], test=splits[2],
        feature_names=list(preprocessor.get_feature_names_out()), sensitive=sensitive,
        group_names=list(attribute.groups), protocol=_describe(name, sensitive, rows, seed, split_seed),
        preprocessor=preprocessor,
    )


def _describe(name: str, sensitive: str, rows: _Rows, seed: int, split_seed: int) -> str:
    spec = BENCHMARKS[name]
    kept = f"{len(_parsed(name)):,} rows" + (f" after {spec.keep_note}" if spec.keep is not None else "")
    return (f"{name}: {kept}; {rows.outside} rows outside the groups of {sensitive} dropped; {rows.missing} rows "
            f"with missing values dropped; positive {spec.label}={spec.positive}: {spec.meaning}; stratified by "
            f"label and group: test {TEST_FRACTION:.0%} (split seed {split_seed}), validation "
            f"{(1 - TEST_FRACTION) * VAL_FRACTION:.0%} (seed {seed}), train the rest")


__all__ = ["BENCHMARKS", "Attribute", "Benchmark", "benchmark_frame", "load_benchmark", "split_indices"]
