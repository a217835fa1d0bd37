"""Tests for the ``groupmixnorm`` command line: a real run's record, reproducible commands, and errors
that end in one line and exit code 2."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from groupmixnorm import cli
from groupmixnorm.metrics import METRIC_NAMES

REQUIRED_KEYS = {
    "accuracy", "ap", "dp_gap", "eopp_gap", "eodds_gap", "dp_gap_hard", "eopp_gap_hard", "eodds_gap_hard",
    "method", "setting", "seed", "command", "timings", "group_rates", "history",
}


def _spec(argv: list[str]):
    return cli.spec_from_args(cli.build_parser().parse_args(argv))


def _reparse(command: str):
    words = shlex.split(command)
    assert words[0] == "groupmixnorm"
    return _spec(words[1:])


# --- a real run on Adult ---------------------------------------------------------------------------

ERM_ARGV = ["train", "--dataset", "adult", "--method", "erm", "--epochs", "1", "--hidden", "16", "--quiet"]


@pytest.fixture(scope="module")
def erm_run(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("erm")
    assert cli.main([*ERM_ARGV, "--out", str(out)]) == 0
    return out, json.loads((out / "metrics.json").read_text())


def test_train_writes_a_complete_record(erm_run) -> None:
    out, record = erm_run
    assert REQUIRED_KEYS <= set(record)
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json"]  # no temporary file left
    for key in METRIC_NAMES:
        assert math.isfinite(record[key]) and 0.0 <= record[key] <= 1.0, key
    assert record["accuracy"] > 0.7  # one epoch on Adult already beats the majority class rate (~0.76)
    assert (record["method"], record["setting"], record["seed"]) == ("erm", "default", 0)
    assert set(record["group_rates"]) == {"Female", "Male"}
    assert sum(row["count"] for row in record["group_rates"].values()) == record["dataset"]["rows"]["test"]
    assert len(record["history"]) == 1 and record["selected_epoch"] == 0
    assert len(record["timings"]["epoch_seconds"]) == 1
    assert record["uses_sensitive_at_prediction"] is False


def test_record_command_reparses_to_the_same_spec(erm_run) -> None:
    out, record = erm_run
    original = _spec([*ERM_ARGV, "--out", str(out)])
    assert _reparse(record["command"]) == original
    assert record["spec"] == json.loads(json.dumps(original.to_dict()))
    words = shlex.split(record["command"])
    assert words[words.index("--out") + 1] == str(out)


def test_format_summary_shows_metrics_and_groups(erm_run) -> None:
    _, record = erm_run
    text = cli.format_summary(record)
    assert "erm (default), seed 0, selected epoch 1 of 1," in text
    assert "Female" in text and "Male" in text
    assert f"{record['ap']:.4f}" in text


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--method", "gmn", "--mix", "pairwise", "--alpha", "0.5", "--align-covariance", "true",
         "--placement", "0,head", "--hidden", "8,4", "--iterations", "5", "--gap-target", "0.1",
         "--select", "ap", "--gap-metric", "eodds_gap", "--lr", "0.02", "--seed", "7", "--out", "x"],
        ["train", "--method", "gapreg", "--lam", "2.5", "--fairness", "eo", "--sensitive", "race",
         "--protocol", "fairmixup", "--quantize", "--sampling", "group_label", "--batch-size", "64",
         "--weight-decay", "0.0001", "--select", "dp_gap", "--out", "x"],
        ["train", "--method", "adversarial", "--adversary-lr", "0.01", "--epochs", "3", "--out", "x"],
    ],
)
def test_spec_command_round_trips_through_the_parser(argv) -> None:
    spec = _spec(argv)
    assert _reparse(spec.command(out="x")) == spec


# --- errors ----------------------------------------------------------------------------------------


def _one_line_error(capsys, argv: list[str], *expected: str) -> list[str]:
    """Exit code 2, no traceback, and exactly one error line, the last one on stderr."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    assert lines[-1].startswith("groupmixnorm train: error:"), err
    assert sum("error" in line for line in lines) == 1, err
    for text in expected:
        assert text in lines[-1]
    return lines


def test_foreign_method_flag_is_a_one_line_error(capsys, tmp_path) -> None:
    _one_line_error(capsys, ["train", "--method", "erm", "--lam", "1", "--out", str(tmp_path)], "--lam", "erm")
    assert not (tmp_path / "metrics.json").exists()


def test_bad_hidden_is_a_one_line_error(capsys, tmp_path) -> None:
    _one_line_error(capsys, ["train", "--method", "erm", "--hidden", "a,b", "--out", str(tmp_path)], "--hidden")
    _one_line_error(capsys, ["train", "--method", "erm", "--hidden", "16,0", "--out", str(tmp_path)], "--hidden")


def test_unknown_sensitive_attribute_is_a_one_line_error(capsys, tmp_path) -> None:
    _one_line_error(capsys, ["train", "--method", "erm", "--sensitive", "religion", "--out", str(tmp_path)],
                    "religion")


def test_quantize_with_the_official_protocol_is_a_one_line_error(capsys, tmp_path) -> None:
    _one_line_error(capsys, ["train", "--method", "erm", "--protocol", "official", "--quantize",
                             "--out", str(tmp_path)], "quantize")


def test_data_option_error_prints_only_the_error_line(capsys, tmp_path) -> None:
    lines = _one_line_error(capsys, ["train", "--method", "erm", "--sensitive", "religion", "--out", str(tmp_path)])
    assert len(lines) == 1, lines


def test_invalid_loop_setting_is_a_one_line_error(capsys, tmp_path) -> None:
    _one_line_error(capsys, ["train", "--method", "erm", "--epochs", "0", "--out", str(tmp_path)], "epochs")


def test_bad_choice_exits_2_through_argparse(capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", "--method", "erm", "--sampling", "balanced", "--out", str(tmp_path)])
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert "--sampling" in err and "Traceback" not in err


def test_debug_after_train_reraises(tmp_path) -> None:
    with pytest.raises(cli.UsageError, match="--lam"):
        cli.main(["train", "--debug", "--method", "erm", "--lam", "1", "--out", str(tmp_path)])
    with pytest.raises(ValueError, match="religion"):
        cli.main(["train", "--debug", "--sensitive", "religion", "--out", str(tmp_path)])


def test_debug_before_train_reraises(tmp_path) -> None:
    with pytest.raises(cli.UsageError, match="--lam"):
        cli.main(["--debug", "train", "--method", "erm", "--lam", "1", "--out", str(tmp_path)])


# --- help ------------------------------------------------------------------------------------------


def test_train_help_exits_0_and_lists_the_flags(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        cli.main(["train", "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--method", "--lam", "--mix", "--hidden", "--select", "--out"):
        assert flag in out, flag


def test_no_command_prints_help_and_returns_2(capsys) -> None:
    assert cli.main([]) == 2
    assert "train" in capsys.readouterr().out


def test_module_entry_point_help() -> None:
    completed = subprocess.run([sys.executable, "-m", "groupmixnorm.cli", "train", "--help"],
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert "--method" in completed.stdout


def test_bench_rejects_methods_for_a_bench_without_method_sweeps(capsys):
    assert cli.main(["bench", "adult-unseen", "--methods", "gmn"]) == 2
    assert ("--methods applies to the adult, celeba, colored-digits, fair-by-constraint, tabular and textured-digits "
            "benches") in \
        capsys.readouterr().err


def test_threads_default_to_one_for_tabular_data_and_follow_the_flag(tmp_path, capsys) -> None:
    import torch

    from groupmixnorm.cli import main

    args = ["train", "--dataset", "adult", "--method", "erm", "--epochs", "1", "--iterations", "2", "--quiet"]
    try:
        torch.set_num_threads(2)
        assert main([*args, "--out", str(tmp_path / "a")]) == 0
        assert torch.get_num_threads() == 1
        assert main([*args, "--threads", "2", "--out", str(tmp_path / "b")]) == 0
        assert torch.get_num_threads() == 2
        assert main([*args, "--threads", "0", "--out", str(tmp_path / "c")]) == 2
        assert "--threads must be at least 1" in capsys.readouterr().err
    finally:
        torch.set_num_threads(1)


def test_every_loop_setting_is_a_train_flag_with_the_loops_default():
    """``RunSpec.command`` writes one flag per ``TrainConfig`` field, so each must exist on ``train`` with the
    loop's own default (``--epochs`` defaults to a step budget instead; ``--device`` follows the machine;
    ``--select`` is left unset so that a ``--max-gap`` search can default to accuracy, and resolves to the
    loop's default otherwise)."""
    import argparse
    import dataclasses

    from groupmixnorm.cli import build_parser
    from groupmixnorm.training import TrainConfig

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = commands.choices["train"]
    parser._pending_options(parser)  # the options a parse of `train` would add
    train = {action.dest: action for action in parser._actions}
    for item in dataclasses.fields(TrainConfig):
        assert item.name in train, f"--{item.name.replace('_', '-')} is missing from train"
        if item.name not in ("epochs", "device", "hidden", "select"):
            assert train[item.name].default == item.default, item.name
    from groupmixnorm.cli.train import spec_from_args

    args = build_parser().parse_args(["train", "--dataset", "german", "--out", "unused"])
    assert train["select"].default is None and spec_from_args(args).config.select == TrainConfig.select
