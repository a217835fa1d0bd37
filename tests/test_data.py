"""Tests for the bundled datasets: sizes, splits, preprocessing, groups and option checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import groupmixnorm.data as data_pkg
from groupmixnorm.data import (
    ADULT_COLUMNS,
    Split,
    TabularDataset,
    available_datasets,
    load_adult,
    load_dataset,
    read_adult_frame,
)
from groupmixnorm.data.adult import NUMERIC_COLUMNS, bundled_file


@pytest.fixture(scope="module")
def official() -> TabularDataset:
    return load_adult()


@pytest.fixture(scope="module")
def official_with_sex() -> TabularDataset:
    return load_adult(include_sensitive=True)


@pytest.fixture(scope="module")
def fairmixup() -> TabularDataset:
    return load_adult(protocol="fairmixup", seed=0)


@pytest.fixture(scope="module")
def race() -> TabularDataset:
    return load_adult(sensitive="race")


@pytest.fixture(scope="module")
def raw_frames() -> dict[str, object]:
    return {split: read_adult_frame(split) for split in ("train", "test")}


def _splits(dataset: TabularDataset) -> list[Split]:
    return [dataset.train, dataset.val, dataset.test]


# --- raw files -------------------------------------------------------------------------------------


def test_raw_frames_match_the_uci_files(raw_frames) -> None:
    train, test = raw_frames["train"], raw_frames["test"]
    assert list(train.columns) == ADULT_COLUMNS == list(test.columns)
    assert (len(train), len(test)) == (32_561, 16_281)
    for frame in (train, test):
        assert set(frame["income"]) == {"<=50K", ">50K"}
        assert not (frame.select_dtypes(exclude="number") == "?").any().any()
        assert frame["occupation"].isna().any()
        assert all(np.issubdtype(frame[c].dtype, np.number) for c in NUMERIC_COLUMNS)
    assert test.loc[0, "age"] == 25  # the marker line was skipped, not read as a row


def test_read_adult_frame_rejects_unknown_split() -> None:
    with pytest.raises(ValueError, match="train"):
        read_adult_frame("validation")  # type: ignore[arg-type]


def test_resources_live_inside_the_package() -> None:
    package_dir = Path(data_pkg.__file__).resolve().parent
    for name in ("adult.data.gz", "adult.test.gz"):
        path = Path(str(bundled_file(name))).resolve()
        assert path.is_file()
        assert path.is_relative_to(package_dir)
        assert "shared" not in path.relative_to(package_dir).parts


# --- official protocol -----------------------------------------------------------------------------


def test_official_sizes(official) -> None:
    assert len(official.train) + len(official.val) == 32_561
    assert len(official.test) == 16_281
    assert len(official.val) / 32_561 == pytest.approx(0.2, abs=0.001)
    assert official.name == "adult" and official.protocol == "official"


def test_official_arrays(official) -> None:
    for split in _splits(official):
        assert split.X.dtype == np.float32 and split.X.shape == (len(split), official.num_features)
        assert np.isfinite(split.X).all()
        assert split.y.dtype == np.int64 and set(np.unique(split.y)) == {0, 1}
        assert split.a.dtype == np.int64 and set(np.unique(split.a)) == {0, 1}
    assert len(official.feature_names) == official.num_features


def test_official_rates(official) -> None:
    assert official.train.y.mean() == pytest.approx(0.24, abs=0.01)
    assert official.group_names == ["Female", "Male"] and official.num_groups == 2
    assert (official.train.a == 0).mean() == pytest.approx(0.33, abs=0.01)


def test_sensitive_attribute_excluded_by_default(official, official_with_sex) -> None:
    assert not any(name.startswith("sex_") for name in official.feature_names)
    assert {"sex_Female", "sex_Male"} <= set(official_with_sex.feature_names)
    assert official_with_sex.num_features == official.num_features + 2


def test_sensitive_column_matches_group_ids(official_with_sex) -> None:
    male = official_with_sex.feature_names.index("sex_Male")
    for split in _splits(official_with_sex):
        np.testing.assert_array_equal(split.X[:, male], split.a)


def test_scaler_fitted_on_train_part_only(official) -> None:
    age = official.feature_names.index("age")
    train_age = official.train.X[:, age].astype(np.float64)
    assert train_age.mean() == pytest.approx(0.0, abs=1e-5)
    assert train_age.std() == pytest.approx(1.0, abs=1e-4)
    for split in (official.val, official.test):
        assert abs(split.X[:, age].astype(np.float64).mean()) > 1e-4  # not refitted on this split


def test_missing_categories_are_imputed_not_dropped(official) -> None:
    occupation = [i for i, name in enumerate(official.feature_names) if name.startswith("occupation_")]
    # Every row has exactly one occupation: the missing ones got the training mode.
    for split in _splits(official):
        np.testing.assert_array_equal(split.X[:, occupation].sum(axis=1), 1.0)


def test_preprocessor_transforms_new_raw_rows(official, raw_frames) -> None:
    rows = raw_frames["test"].head(5).drop(columns=["income", "sex"])
    X = official.preprocessor.transform(rows)
    np.testing.assert_allclose(X, official.test.X[:5], rtol=1e-6, atol=1e-6)


def test_describe(official) -> None:
    table = official.describe()
    assert list(table.index) == ["train", "val", "test"]
    assert list(table.columns) == ["n", "positive_rate", "share_Female", "share_Male"]
    assert table.loc["test", "n"] == 16_281
    np.testing.assert_allclose(table[["share_Female", "share_Male"]].sum(axis=1), 1.0)


# --- fairmixup protocol ----------------------------------------------------------------------------


def test_fairmixup_sizes(fairmixup, raw_frames) -> None:
    merged = [frame.dropna(subset=["occupation", "native-country"]) for frame in raw_frames.values()]
    expected = sum(len(frame) for frame in merged)
    sizes = [len(split) for split in _splits(fairmixup)]
    assert sum(sizes) == expected
    for size, share in zip(sizes, (0.6, 0.2, 0.2)):
        assert abs(size - share * expected) <= 1
    assert all(np.isfinite(split.X).all() for split in _splits(fairmixup))
    assert not any(name.startswith("sex_") for name in fairmixup.feature_names)


def test_fairmixup_seed_changes_split_and_is_reproducible(fairmixup) -> None:
    same = load_adult(protocol="fairmixup", seed=0)
    other = load_adult(protocol="fairmixup", seed=1)
    for mine, again in zip(_splits(fairmixup), _splits(same)):
        np.testing.assert_array_equal(mine.X, again.X)
        np.testing.assert_array_equal(mine.y, again.y)
        np.testing.assert_array_equal(mine.a, again.a)
    assert len(other.train) == len(fairmixup.train)
    assert not np.array_equal(fairmixup.train.y, other.train.y)
    assert not np.array_equal(fairmixup.test.a, other.test.a)


def test_fairmixup_quantize_gives_binary_features() -> None:
    dataset = load_adult(protocol="fairmixup", quantize=True)
    for split in _splits(dataset):
        assert np.isin(split.X, (0.0, 1.0)).all()
    age_bins = [name for name in dataset.feature_names if name.startswith("age_")]
    assert 1 < len(age_bins) <= 10


# --- race ------------------------------------------------------------------------------------------


def test_race_groups(race) -> None:
    assert race.num_groups == 5
    assert race.group_names == sorted(race.group_names)
    assert race.group_names[-1] == "White"
    for split in _splits(race):
        assert set(np.unique(split.a)) == set(range(5))
    assert not any(name.startswith("race_") for name in race.feature_names)
    assert any(name.startswith("sex_") for name in race.feature_names)


# --- registry and errors ---------------------------------------------------------------------------


def test_registry() -> None:
    assert {"adult", "colored-digits", "celeba"} <= set(available_datasets())
    assert available_datasets() == sorted(available_datasets())
    with pytest.raises(ValueError, match="adult"):
        load_dataset("mnist")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"protocol": "kaggle"}, "protocol"),
        ({"sensitive": "age"}, "sensitive"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 0.6}, "val_fraction"),
        ({"quantize": True}, "quantize"),
    ],
)
def test_invalid_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_dataset("adult", **options)
