"""Determinism: the same command with the same seed gives identical numbers on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from groupmixnorm.cli import main
from groupmixnorm.metrics import METRIC_NAMES

SMALL = ["--dataset", "adult", "--epochs", "2", "--iterations", "10", "--batch-size", "128", "--hidden", "32", "--quiet"]


def _numbers(folder: Path) -> tuple[dict, list]:
    record = json.loads((folder / "metrics.json").read_text())
    return {key: record[key] for key in METRIC_NAMES}, record["history"]


@pytest.mark.parametrize("method", [["erm"], ["gmn"], ["gmn", "--placement", "all", "--align", "0", "--mix", "pairwise"],
                                    ["gapreg"], ["adversarial"], ["fairmixup"]])
def test_the_same_command_twice_gives_identical_numbers(tmp_path: Path, method: list[str]) -> None:
    for name in ("first", "second"):
        assert main(["train", "--method", *method, *SMALL, "--out", str(tmp_path / name)]) == 0
    assert _numbers(tmp_path / "first") == _numbers(tmp_path / "second")


def test_a_different_seed_gives_different_numbers(tmp_path: Path) -> None:
    for seed in ("0", "1"):
        assert main(["train", "--method", "gmn", *SMALL, "--seed", seed, "--out", str(tmp_path / seed)]) == 0
    assert _numbers(tmp_path / "0")[0] != _numbers(tmp_path / "1")[0]


def test_fresh_processes_agree(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("first", "second"):
        subprocess.run([sys.executable, "-m", "groupmixnorm", "train", "--method", "gmn", *SMALL, "--out",
                        str(tmp_path / name)], check=True, env=env, timeout=300)
    assert _numbers(tmp_path / "first") == _numbers(tmp_path / "second")
