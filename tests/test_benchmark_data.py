"""Tests for the bundled tabular benchmark sets (German credit, COMPAS, credit default Taiwan, law school):
files and provenance, row filters, groups, labels, left-out columns, splits and the CLI."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from groupmixnorm import cli
from groupmixnorm.cli.train import DATASET_DEFAULTS
from groupmixnorm.data import available_datasets, load_dataset
from groupmixnorm.data.adult import bundled_file
from groupmixnorm.data import benchmarks
from groupmixnorm.data.benchmarks import BENCHMARKS, benchmark_frame, load_benchmark, split_indices
from groupmixnorm.data.tabular import TabularDataset

#: sha256 of each decompressed file, as /work/shared/data/README.md gives them.
SHA256 = {
    "german.data.gz": "b21f3d81db8071257d5ff1deaeba1fd4303b62712e6fcc9715c7a86202cb5871",
    "compas-scores-two-years.csv.gz": "c451db85908b2f7fef1d83203bedf6b71ecda0d5af468d82ae62178f91d0cc7d",
    "credit_default.csv.gz": "425ff71ad4fc0ebdde3406e3e9d153ea434995f512f7cba69c32abb844808a80",
    "law_school.csv.gz": "c3c80191801d39a69d6933fed68a9a32bdc3e10b8b79925e6882511b071a21cd",
}
#: (data set, attribute) -> rows kept, group names in id order, rows per group.
EXPECTED = {
    ("german", "age"): (1000, ["<=25", ">25"], [190, 810]),
    ("german", "sex"): (1000, ["female", "male"], [310, 690]),
    ("compas", "race"): (5278, ["African-American", "Caucasian"], [3175, 2103]),
    ("compas", "race6"): (6172, ["African-American", "Asian", "Caucasian", "Hispanic", "Native American", "Other"],
                          [3175, 31, 2103, 509, 11, 343]),
    ("compas", "sex"): (6172, ["female", "male"], [1175, 4997]),
    ("credit", "sex"): (30000, ["female", "male"], [18112, 11888]),
    ("law", "race"): (21791, ["White", "non-White"], [18285, 3506]),
    ("law", "sex"): (21791, ["female", "male"], [9537, 12254]),
}
#: Share of positive labels over all rows as the data's README gives them (22.1 % default, 88.8 % passed) or the
#: source documents them (700 of 1,000 good credit; 45.5 % of ProPublica's 6,172 re-offended).
POSITIVE_RATE = {"german": 0.700, "compas": 0.455, "credit": 0.221, "law": 0.888}
#: Exact positive counts; COMPAS's two-group race keeps 5,278 rows, of which 47.0 % re-offended.
POSITIVES = {("german", "age"): 700, ("german", "sex"): 700, ("compas", "race"): 2483, ("compas", "race6"): 2809,
             ("compas", "sex"): 2809, ("credit", "sex"): 6636, ("law", "race"): 19360, ("law", "sex"): 19360}
#: Raw columns that must never be an input, whatever the attribute.
NEVER_INPUTS = {
    "german": ["personal_status_sex", "credit_risk"],
    "compas": ["id", "name", "decile_score", "score_text", "is_recid", "v_decile_score", "two_year_recid",
               "age_cat", "days_b_screening_arrest"],
    "credit": ["ID", "default_payment_next_month"],
    "law": ["ZFYA", "pass_bar"],
}
#: Raw columns that encode each attribute: absent from the inputs when it is protected.
ENCODES = {("german", "age"): ["age"], ("german", "sex"): ["personal_status_sex"], ("compas", "race"): ["race"],
           ("compas", "race6"): ["race"], ("compas", "sex"): ["sex"], ("credit", "sex"): ["SEX"],
           ("law", "race"): ["race"], ("law", "sex"): ["sex"]}

_LOADED: dict[tuple[str, str, int, int], TabularDataset] = {}


def _load(name: str, sensitive: str, seed: int = 0, split_seed: int = 0) -> TabularDataset:
    key = (name, sensitive, seed, split_seed)
    if key not in _LOADED:
        _LOADED[key] = load_dataset(name, sensitive=sensitive, seed=seed, split_seed=split_seed)
    return _LOADED[key]


def _splits(data: TabularDataset):
    return (data.train, data.val, data.test)


def _uses_column(feature_names: list[str], column: str) -> bool:
    """Whether ``column`` (numeric, or one-hot as ``column_value``) is among the encoded inputs."""
    return any(name == column or name.startswith(column + "_") for name in feature_names)


# --- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("file", sorted(SHA256))
def test_bundled_files_decompress_to_the_published_bytes(file):
    raw = gzip.decompress(bundled_file(file).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == SHA256[file]
    provenance = bundled_file("PROVENANCE.md").read_text(encoding="utf-8")
    assert SHA256[file] in provenance and file in provenance


def test_every_benchmark_reads_a_bundled_file():
    assert {spec.file for spec in BENCHMARKS.values()} == set(SHA256)


# --- rows, groups, labels ---------------------------------------------------------------------------


def test_compas_follows_propublicas_filter():
    frame = benchmark_frame("compas")
    assert len(frame) == 6172
    assert (frame["days_b_screening_arrest"].abs() <= 30).all() and (frame["is_recid"] != -1).all()
    assert set(frame["c_charge_degree"]) == {"F", "M"} and frame["score_text"].notna().all()


@pytest.mark.parametrize("name, sensitive", sorted(EXPECTED))
def test_rows_and_groups(name, sensitive):
    rows, groups, counts = EXPECTED[(name, sensitive)]
    data = _load(name, sensitive)
    assert data.name == name and data.sensitive == sensitive and data.group_names == groups
    assert sum(len(s) for s in _splits(data)) == rows
    a = np.concatenate([s.a for s in _splits(data)])
    assert np.bincount(a, minlength=len(groups)).tolist() == counts


def test_compas_race_says_how_many_rows_of_other_races_it_drops():
    assert "894 rows outside the groups" in _load("compas", "race").protocol
    assert "0 rows outside the groups" in _load("compas", "race6").protocol


@pytest.mark.parametrize("name, sensitive", sorted(EXPECTED))
def test_positive_rate_and_no_missing_values(name, sensitive):
    data = _load(name, sensitive)
    y = np.concatenate([s.y for s in _splits(data)])
    assert set(np.unique(y)) == {0, 1}
    assert y.sum() == POSITIVES[(name, sensitive)]
    if (name, sensitive) != ("compas", "race"):
        assert abs(y.mean() - POSITIVE_RATE[name]) < 0.0006
    assert "0 rows with missing values dropped" in data.protocol
    assert all(np.isfinite(s.X).all() and s.X.dtype == np.float32 for s in _splits(data))


def test_rows_with_a_missing_value_are_dropped_and_counted(monkeypatch):
    def read_with_gaps(raw: bytes):
        frame = benchmarks._read_german(raw)
        frame.loc[:4, "duration"] = np.nan
        return frame

    monkeypatch.setitem(BENCHMARKS, "gappy", dataclasses.replace(BENCHMARKS["german"], read=read_with_gaps))
    try:
        data = load_benchmark("gappy", "sex")
    finally:
        benchmarks._parsed.cache_clear()
    assert "5 rows with missing values dropped" in data.protocol
    assert sum(len(s) for s in _splits(data)) == 995 and all(np.isfinite(s.X).all() for s in _splits(data))


def test_the_parsed_file_is_cached_and_callers_get_copies():
    frame = benchmark_frame("law")
    frame.loc[0, "LSAT"] = -1.0
    assert benchmark_frame("law").loc[0, "LSAT"] != -1.0 and benchmarks._parsed.cache_info().hits > 0

def test_german_label_is_good_credit_and_sex_comes_from_a9():
    frame = benchmark_frame("german")
    data = _load("german", "sex")
    y = np.concatenate([s.y for s in _splits(data)])
    assert y.sum() == (frame["credit_risk"] == 1).sum() == 700
    female = frame["personal_status_sex"].isin(["A92", "A95"])
    assert female.sum() == 310 and frame.loc[~female, "personal_status_sex"].isin(["A91", "A93", "A94"]).all()


# --- inputs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, sensitive", sorted(EXPECTED))
def test_protected_and_left_out_columns_are_not_inputs(name, sensitive):
    names = _load(name, sensitive).feature_names
    for column in ENCODES[(name, sensitive)] + NEVER_INPUTS[name]:
        assert not _uses_column(names, column), column
    assert set(NEVER_INPUTS[name]) <= set(BENCHMARKS[name].left_out) | {BENCHMARKS[name].label}


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_column_is_an_input_the_label_or_left_out_with_a_reason(name):
    spec = BENCHMARKS[name]
    columns = set(benchmark_frame(name).columns)
    inputs = set(spec.numeric) | set(spec.categorical)
    assert columns == inputs | {spec.label} | set(spec.left_out)
    assert not inputs & set(spec.left_out) and all(spec.left_out.values())

def test_the_other_attribute_stays_an_input():
    assert _uses_column(_load("german", "sex").feature_names, "age")
    assert _uses_column(_load("compas", "sex").feature_names, "race")
    assert _uses_column(_load("compas", "race").feature_names, "sex")
    assert _uses_column(_load("law", "sex").feature_names, "race")
    assert sorted(_load("law", "race").feature_names) == ["LSAT", "UGPA", "sex_female", "sex_male"]


def test_compas_inputs_are_the_usual_eight():
    names = _load("compas", "sex").feature_names
    numeric = ["age", "juv_fel_count", "juv_misd_count", "juv_other_count", "priors_count"]
    assert names[:5] == numeric
    assert {n.split("_")[0] for n in names[5:]} == {"race", "c"}  # race_*, c_charge_degree_*


def test_credit_codes_education_and_marriage_as_categories():
    names = _load("credit", "sex").feature_names
    assert "EDUCATION" not in names and "EDUCATION_1" in names and "MARRIAGE_3" in names
    assert {"PAY_0", "PAY_6", "AGE", "LIMIT_BAL"} <= set(names)


def test_preprocessing_is_fitted_on_train_only():
    data = _load("credit", "sex")
    numeric = [i for i, n in enumerate(data.feature_names) if n in ("LIMIT_BAL", "AGE", "BILL_AMT1")]
    assert np.allclose(data.train.X[:, numeric].mean(axis=0), 0, atol=1e-5)
    assert not np.allclose(data.val.X[:, numeric].mean(axis=0), 0, atol=1e-5)


# --- splits -----------------------------------------------------------------------------------------


def test_splits_are_60_20_20_and_stratified_by_label_and_group():
    data = _load("compas", "race6")
    sizes = np.array([len(s) for s in _splits(data)]) / 6172
    assert np.allclose(sizes, [0.6, 0.2, 0.2], atol=0.002)
    all_y = np.concatenate([s.y for s in _splits(data)])
    all_a = np.concatenate([s.a for s in _splits(data)])
    for split in _splits(data):
        share = len(split) / len(all_y)
        for g in range(data.num_groups):
            for label in (0, 1):
                cell = int(((all_a == g) & (all_y == label)).sum())
                assert abs(int(((split.a == g) & (split.y == label)).sum()) - share * cell) <= 1


def test_same_seeds_same_split():
    first = load_benchmark("german", "age", seed=3, split_seed=5)
    second = load_benchmark("german", "age", seed=3, split_seed=5)
    for a, b in zip(_splits(first), _splits(second)):
        assert np.array_equal(a.X, b.X) and np.array_equal(a.y, b.y) and np.array_equal(a.a, b.a)


def test_test_split_depends_on_split_seed_only():
    base = split_indices("law", "race", seed=0, split_seed=0)
    other_seed = split_indices("law", "race", seed=1, split_seed=0)
    other_split_seed = split_indices("law", "race", seed=0, split_seed=1)
    assert np.array_equal(base[2], other_seed[2])
    assert not np.array_equal(base[1], other_seed[1])
    assert not np.array_equal(base[2], other_split_seed[2])
    for train, val, test in (base, other_seed, other_split_seed):
        assert not (set(train) & set(val) or set(train) & set(test) or set(val) & set(test))
        assert len(train) + len(val) + len(test) == 21791


def test_training_seed_does_not_change_the_loaded_test_split():
    first, second = _load("german", "sex", seed=0), _load("german", "sex", seed=1)
    assert np.array_equal(first.test.y, second.test.y) and np.array_equal(first.test.a, second.test.a)


# --- options and errors -----------------------------------------------------------------------------


def test_names_are_registered():
    assert {"german", "compas", "credit", "law"} <= set(available_datasets())


def test_unknown_attribute_is_a_clear_error():
    with pytest.raises(ValueError, match=r"unknown sensitive attribute 'age' for compas; choose from .*race6"):
        load_dataset("compas", sensitive="age")


def test_fairmixup_protocol_does_not_apply():
    with pytest.raises(ValueError, match="protocol 'fairmixup' does not apply to law"):
        load_dataset("law", sensitive="race", protocol="fairmixup")


def test_default_attribute_is_the_first_listed():
    assert _load("law", "race").sensitive == load_benchmark("law").sensitive == next(iter(BENCHMARKS["law"].attributes))


# --- command line -----------------------------------------------------------------------------------


def test_cli_defaults_name_every_benchmark_with_a_known_attribute():
    for name, spec in BENCHMARKS.items():
        assert DATASET_DEFAULTS[name].sensitive in spec.attributes
        assert "split_seed" in DATASET_DEFAULTS[name].options


@pytest.mark.parametrize("name, sensitive", sorted(EXPECTED))
def test_cli_spec_for_every_attribute(name, sensitive):
    args = cli.build_parser().parse_args(["train", "--dataset", name, "--sensitive", sensitive, "--method", "erm",
                                          "--split-seed", "2", "--out", "unused"])
    spec = cli.spec_from_args(args)
    assert (spec.dataset, spec.sensitive, spec.dataset_options) == (name, sensitive, {"split_seed": 2})


def test_cli_trains_on_a_benchmark(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--dataset", "german", "--sensitive", "sex", "--method", "erm", "--epochs", "1", "--hidden", "8",
            "--quiet", "--out", str(out)]
    assert cli.main(argv) == 0
    record = json.loads((out / "metrics.json").read_text())
    assert record["dataset"]["name"] == "german" and record["dataset"]["group_names"] == ["female", "male"]
    assert sum(record["dataset"]["rows"].values()) == 1000


def test_cli_refuses_an_unknown_attribute(tmp_path, capsys):
    argv = ["train", "--dataset", "credit", "--sensitive", "AGE", "--method", "erm", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert "unknown sensitive attribute 'AGE' for credit" in capsys.readouterr().err


def test_a_benchmark_run_fingerprints_its_bundled_file():
    from groupmixnorm.experiments.spec import data_fingerprint

    fingerprint = data_fingerprint({"dataset": "law", "dataset_options": {}})
    assert fingerprint is not None and list(fingerprint["files"]) == ["law_school.csv.gz"]

