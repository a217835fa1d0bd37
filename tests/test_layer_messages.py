"""The data and training layers name their own arguments in errors; the command line names its flags."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from groupmixnorm import cli
from groupmixnorm.data.celeba import load_celeba
from groupmixnorm.data.csv import CSVError, load_csv_dataset
from groupmixnorm.training.checkpoint import save_checkpoint


def _library_error(error_type: type[Exception], call, *pieces: str) -> str:
    with pytest.raises(error_type) as raised:
        call()
    message = str(raised.value)
    assert "--" not in message and all(piece in message for piece in pieces), message
    return message


def test_library_errors_name_arguments_not_flags(tmp_path) -> None:
    table = tmp_path / "t.csv"
    _library_error(CSVError, lambda: load_csv_dataset(table, label="y"), str(table), "label", "sensitive")
    _library_error(CSVError, lambda: load_csv_dataset(table, "g", "fairmixup", label="y"),
                   "protocol 'fairmixup'", "test_size", "split_seed")
    _library_error(ValueError, lambda: load_celeba(data_dir=None), "data_dir", "list_attr_celeba.txt")
    images = SimpleNamespace(input_shape=(3, 8, 8))
    _library_error(ValueError, lambda: save_checkpoint(tmp_path / "m.pt", model=None, method=None, spec=None,
                                                       data=images), "m.pt", "image models")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("argv, message", [
    (["--csv", "{dir}/x.csv", "--label", "y", "--sensitive", "g", "--protocol", "fairmixup"],
     "--protocol fairmixup does not apply to --csv (its split is set by --test-size and --split-seed)"),
    (["--dataset", "colored-digits", "--save", "{dir}/m.pt"], "--save writes models that score CSV rows"),
    (["--dataset", "adult", "--protocol", "fairmixup", "--quantize", "--save", "{dir}/m.pt"],
     "--save does not combine with --quantize"),
    (["--method", "expgrad", "--save", "{dir}/m.pt"], "--save supports the torch-trained methods; expgrad"),
])
def test_the_command_line_names_the_flag_before_anything_trains(tmp_path, capsys, argv, message) -> None:
    out = tmp_path / "run"
    argv = [part.replace("{dir}", str(tmp_path)) for part in argv]
    assert cli.main(["train", *argv, "--epochs", "1", "--quiet", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not out.exists() and not (tmp_path / "m.pt").exists()
