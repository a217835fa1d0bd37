"""What the tool tells its user: file modes that follow the umask, errors that name the real cause (rows
dropped, the group's value, divergence, the column of an infinity, a missing CUDA), warnings about columns
that defeat the purpose, and help text that is accurate and fast to show."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from groupmixnorm import cli
from groupmixnorm.data import Split, TabularDataset, load_csv
from groupmixnorm.data.csv import CSVError, DataWarning, column_warnings
from groupmixnorm.methods import ERM
from groupmixnorm.training import TrainConfig, TrainingDiverged, train
from groupmixnorm.files import write_json_atomic, write_text_atomic


@contextmanager
def umask(mask: int):
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def table(n: int = 400, seed: int = 0, **columns) -> pd.DataFrame:
    """Two groups, a binary label, a noise feature and a categorical one, plus ``columns``."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"x": rng.normal(size=n).round(4), "c": rng.choice(list("abc"), n),
                          "g": rng.choice(["f", "m"], n), "y": rng.integers(0, 2, n)})
    for name, values in columns.items():
        frame[name] = values(frame) if callable(values) else values
    return frame


def write(frame: pd.DataFrame, folder: Path, name: str = "t.csv") -> Path:
    path = folder / name
    frame.to_csv(path, index=False)
    return path


def train_csv(path: Path, out: Path, *extra: str) -> int:
    return cli.main(["train", "--csv", str(path), "--label", "y", "--sensitive", "g", "--method", "erm",
                     "--epochs", "1", "--hidden", "8", "--quiet", "--out", str(out), *extra])


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


# --- 1. file modes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600)])
def test_new_files_get_the_mode_open_would_give(tmp_path, mask, expected) -> None:
    with umask(mask):
        text = write_text_atomic(tmp_path / "sub" / "a.txt", "hello\n")
        record = write_json_atomic(tmp_path / "b.json", {"x": 1})
    assert mode(text) == expected and mode(record) == expected
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_replacing_a_file_keeps_its_mode(tmp_path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("old")
    path.chmod(0o640)
    with umask(0o077):
        write_text_atomic(path, "new")
    assert path.read_text() == "new" and mode(path) == 0o640


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_train_and_export_write_files_with_the_umask(tmp_path, mask) -> None:
    expected = 0o666 & ~mask
    with umask(mask):
        assert cli.main(["train", "--method", "erm", "--epochs", "1", "--iterations", "2", "--hidden", "8", "--quiet",
                         "--out", str(tmp_path / "run"), "--save", str(tmp_path / "run" / "model.pt")]) == 0
        written = [tmp_path / "run" / "metrics.json", tmp_path / "run" / "model.pt"]
        pytest.importorskip("onnxscript")
        assert cli.main(["export", "--checkpoint", str(written[1]), "--onnx", str(tmp_path / "m.onnx")]) == 0
        written += [tmp_path / "m.onnx", tmp_path / "m.onnx.json"]
    assert {path.name: mode(path) for path in written} == {path.name: expected for path in written}


def test_the_celeba_cache_follows_the_umask(tmp_path) -> None:
    from groupmixnorm.data.celeba import _save_atomic

    with umask(0o022):
        _save_atomic(tmp_path / "cache.npy", np.zeros((2, 3), dtype=np.uint8))
    assert mode(tmp_path / "cache.npy") == 0o644


# --- 2. errors that name the real cause --------------------------------------------------------------


def test_rows_dropped_for_missing_values_are_counted_in_the_error(tmp_path, capsys) -> None:
    frame = table(1000, z=lambda f: [1.0] + [np.nan] * (len(f) - 1))
    path = write(frame, tmp_path)
    with pytest.raises(CSVError, match=r"999 of 1000 rows .*missing value.*'z'"):
        load_csv(path, label="y", sensitive="g")
    assert train_csv(path, tmp_path / "run") == 2
    line = one_error_line(capsys)
    assert "999 of 1000 rows" in line and "'z'" in line and "drop option" in line


def test_a_group_without_negatives_is_named_by_its_value(tmp_path, capsys) -> None:
    frame = table(600)
    frame.loc[:29, "g"], frame.loc[:29, "y"] = "zed", 1  # a third group whose rows are all positive
    assert train_csv(write(frame, tmp_path), tmp_path / "run") == 2
    line = one_error_line(capsys)
    assert "'zed'" in line and "no negative" in line and "group 2" not in line


@dataclass
class _CountingERM(ERM):
    def __post_init__(self) -> None:
        self.calls = 0

    def training_loss(self, model, batch):
        self.calls += 1
        return super().training_loss(model, batch)


def _dataset(val_groups: np.ndarray, n: int = 64) -> TabularDataset:
    rng = np.random.default_rng(0)

    def split(a: np.ndarray) -> Split:
        y = (np.arange(len(a)) // 2) % 2  # both labels in each group of alternating ids
        return Split(rng.normal(size=(len(a), 3)).astype(np.float32), y, a.astype(np.int64))

    return TabularDataset(name="t", train=split(np.arange(n) % 2), val=split(val_groups), test=split(np.arange(n) % 2),
                          feature_names=["a", "b", "c"], sensitive="s", group_names=["low", "high"], protocol="t",
                          preprocessor=None)


def test_a_split_with_one_group_is_refused_before_training() -> None:
    method = _CountingERM()
    with pytest.raises(ValueError, match=r"validation split .*only group 'low'"):
        train(method, _dataset(np.zeros(32, dtype=np.int64)), TrainConfig(epochs=1, hidden=(4,), batch_size=16))
    assert method.calls == 0


def test_a_csv_whose_tiny_group_misses_the_validation_split_is_refused_before_training(tmp_path, capsys) -> None:
    frame = table(300)
    frame["g"] = "m"
    frame.loc[0, "g"] = "f"  # one row: it lands in one split only
    assert train_csv(write(frame, tmp_path), tmp_path / "run") == 2
    warning, error = capsys.readouterr().err.strip().splitlines()
    assert "warning: group 'f' of 'g' has 1 row(s)" in warning
    assert "error: the validation split has only group 'm'" in error
    assert not (tmp_path / "run" / "train_state.pt").exists()  # no epoch ran


def test_nan_features_are_refused_before_training_naming_the_row_and_column() -> None:
    data = _dataset(np.arange(32) % 2)
    X = data.train.X.copy()
    X[5, 2] = np.nan
    method = _CountingERM()
    with pytest.raises(ValueError, match=r"training split's features .*row index 5, column index 2 \('c'\)"):
        train(method, replace(data, train=Split(X, data.train.y, data.train.a)), TrainConfig(epochs=1, hidden=(4,)))
    assert method.calls == 0


def test_a_huge_learning_rate_is_reported_as_divergence_with_epoch_and_batch(tmp_path, capsys) -> None:
    argv = ["train", "--method", "gmn", "--epochs", "3", "--iterations", "20", "--hidden", "16", "--lr", "1e10",
            "--quiet", "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert "diverged" in line and "epoch" in line and "batch" in line and "input" not in line, line


@dataclass
class _BlowsUpAt(ERM):
    """ERM whose model's activations become non-finite on the ``at``-th call (counting from 0)."""

    at: int = 0

    def __post_init__(self) -> None:
        self.calls = 0

    def training_loss(self, model, batch):
        from groupmixnorm.nn.modules import NonFiniteStatistics

        self.calls += 1
        if self.calls - 1 == self.at:
            raise NonFiniteStatistics("GroupMixNorm1d got non-finite values in training")
        return super().training_loss(model, batch)


def test_non_finite_activations_after_a_step_are_divergence_counted_from_one() -> None:
    data = _dataset(np.arange(32) % 2)
    with pytest.raises(TrainingDiverged, match=r"diverged at epoch 2, batch 2 .*erm") as caught:
        train(_BlowsUpAt(at=4), data, TrainConfig(epochs=3, iterations=3, batch_size=8, hidden=(4,)))
    assert isinstance(caught.value.__cause__, ValueError)


def test_non_finite_activations_before_any_step_are_not_called_divergence() -> None:
    from groupmixnorm.nn.modules import NonFiniteStatistics

    assert issubclass(NonFiniteStatistics, ValueError)  # direct users of the layer catch ValueError as before
    with pytest.raises(NonFiniteStatistics):
        train(_BlowsUpAt(at=0), _dataset(np.arange(32) % 2), TrainConfig(epochs=1, batch_size=8, hidden=(4,)))


def test_infinity_in_a_csv_names_the_column_and_row(tmp_path, capsys) -> None:
    frame = table(100)
    frame["x"] = frame["x"].astype(object)
    frame.loc[6, "x"] = "inf"
    path = write(frame, tmp_path)
    with pytest.raises(CSVError, match=r"column 'x' .*infinite .*row 7"):
        load_csv(path, label="y", sensitive="g")
    assert train_csv(path, tmp_path / "run") == 2
    assert "'x'" in one_error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device, expected", [("cuda", "CUDA is not available"), ("cuda:0", "CUDA is not available"),
                                               ("gpu", "not a torch device")])
def test_an_unavailable_device_is_a_user_error(tmp_path, capsys, device, expected) -> None:
    argv = ["train", "--method", "erm", "--epochs", "1", "--iterations", "1", "--hidden", "8", "--quiet",
            "--device", device, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    line = one_error_line(capsys)
    assert expected in line and "internal error" not in line


# --- 3. columns that defeat the purpose --------------------------------------------------------------


def _warnings(frame: pd.DataFrame) -> list[str]:
    features = [c for c in frame.columns if c not in ("y", "g")]
    return column_warnings(frame, features, "g")


def test_a_column_that_encodes_the_protected_attribute_is_named() -> None:
    frame = table(400, status=lambda f: np.where(f["g"] == "m", "A91", "A92"),
                  code=lambda f: np.where(f["g"] == "m", 1.5, 7.25) + np.random.default_rng(1).normal(0, 0.1, len(f)))
    messages = _warnings(frame)
    assert len(messages) == 2, messages
    assert "'status'" in messages[0] and "'g'" in messages[0] and "1.00" in messages[0]
    assert "'code'" in messages[1]


def test_a_noisy_proxy_and_ordinary_columns_pass_without_a_word() -> None:
    rng = np.random.default_rng(2)
    proxy = lambda f: np.where(rng.random(len(f)) < 0.85, f["g"], "other")  # noqa: E731 - 85% agreement
    assert _warnings(table(400, proxy=proxy, age=lambda f: rng.integers(18, 80, len(f)))) == []


def test_an_identifier_column_is_named() -> None:
    frame = table(400, person=lambda f: np.arange(len(f)) + 1000, key=lambda f: [f"u{i:05d}" for i in range(len(f))],
                  whole=lambda f: (np.arange(len(f)) * 3).astype(float))
    messages = _warnings(frame)
    for column in ("person", "key", "whole"):
        assert sum(f"'{column}'" in m and "identifier" in m for m in messages) == 1, messages
    assert not any("'x'" in m for m in messages)  # distinct measurements are not identifiers


def test_a_group_too_small_to_be_measured_is_named(tmp_path) -> None:
    frame = table(300)
    frame.loc[0, "g"] = "tiny"  # one row: in the training split only
    with pytest.warns(DataWarning, match=r"group 'tiny' of 'g' has 1 row\(s\), none in the validation and test"):
        load_csv(write(frame, tmp_path), label="y", sensitive="g")


def test_a_short_table_has_no_identifiers_but_can_leak() -> None:
    messages = _warnings(table(30, person=lambda f: np.arange(len(f)), status=lambda f: f["g"]))
    assert len(messages) == 1 and "'status'" in messages[0], messages


def _column_lines(capsys) -> list[str]:
    """stderr's lines but those on the model (its label is noise: the model is warned about as useless)."""
    return [line for line in capsys.readouterr().err.strip().splitlines() if "the selected model" not in line]


def test_train_prints_one_warning_line_per_suspicious_column(tmp_path, capsys) -> None:
    frame = table(400, status=lambda f: np.where(f["g"] == "m", "A91", "A92"), person=lambda f: np.arange(len(f)))
    path = write(frame, tmp_path)
    assert train_csv(path, tmp_path / "run") == 0
    lines = _column_lines(capsys)
    assert len(lines) == 2, lines
    assert all(line.startswith("groupmixnorm train: warning: ") for line in lines)
    assert "'status'" in lines[0] and "'person'" in lines[1]
    assert train_csv(path, tmp_path / "run2", "--drop", "status,person") == 0
    assert _column_lines(capsys) == []
    with pytest.warns(DataWarning) as caught:
        load_csv(path, label="y", sensitive="g")
    assert ["'status'" in str(w.message) for w in caught] == [True, False]


# --- 4. help text ------------------------------------------------------------------------------------


def _help(*words: str) -> str:
    finished = subprocess.run([sys.executable, "-m", "groupmixnorm", *words, "--help"], capture_output=True,
                              text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    return finished.stdout


@pytest.fixture(scope="module")
def train_help() -> str:
    return " ".join(_help("train").split())


def test_no_internal_metavar_leaks(train_help) -> None:
    assert "DATA_" not in train_help and "METHOD_" not in train_help
    assert "--data-dir DIR" in train_help and "--lam LAM" in train_help


def test_each_default_is_stated_once(train_help) -> None:
    bench = " ".join(_help("bench").split())
    for text in (train_help, bench):
        assert "(default: None)" not in text and "] (default:" not in text
    assert "--target ATTRIBUTE celeba: attribute to predict, e.g. Smiling, Attractive, Wavy_Hair [default: Smiling]" \
        in train_help
    assert "training epochs [default: for tables, given neither --epochs nor --iterations, 20 epochs" in train_help


def test_placement_help_lists_its_default(train_help) -> None:
    start = train_help.index("--placement PLACEMENT")
    assert "logit" in train_help[start:train_help.index("[default: gmn logit]", start)]


def test_boolean_options_are_flags_that_still_accept_a_value(tmp_path) -> None:
    def parsed(*words: str):
        return cli.build_parser().parse_args(["train", *words, "--out", str(tmp_path)])

    assert parsed("--align-covariance").method_align_covariance is True
    assert parsed("--align-covariance", "false").method_align_covariance is False  # commands of older records
    assert parsed("--quantize").quantize is True and parsed("--quantize", "no").quantize is False
    assert parsed().quantize is False and parsed("--strict").data_strict is True


def test_epochs_are_printed_from_one(saved_run) -> None:
    record = json.loads((saved_run("erm", 2, 8) / "metrics.json").read_text())
    from groupmixnorm.cli.train import format_summary

    assert f"selected epoch {record['selected_epoch'] + 1} of 2," in format_summary(record)


def test_top_level_help_imports_no_heavy_library() -> None:
    probe = ("import runpy, sys\n"
             "sys.argv = ['groupmixnorm', '--help']\n"
             "try:\n    runpy.run_module('groupmixnorm', run_name='__main__')\n"
             "except SystemExit as stop:\n    assert stop.code == 0, stop.code\n"
             "heavy = {'torch', 'sklearn', 'matplotlib', 'pandas', 'numpy'}\n"
             "heavy = sorted({m.split('.')[0] for m in sys.modules} & heavy)\n"
             "print('HEAVY', heavy)\n")
    finished = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    assert "train" in finished.stdout and "HEAVY []" in finished.stdout, finished.stdout


def test_a_subcommand_parses_after_a_lazy_build(tmp_path) -> None:
    args = cli.build_parser().parse_args(["bench", "adult", "--quick"])
    assert args.name == "adult" and args.quick
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "nonsense"])
