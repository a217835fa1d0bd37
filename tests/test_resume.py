"""Training faults: a diverged loss stops with its epoch and batch and keeps the last good state; an
interrupted run resumes (in-process and through `train --resume` after SIGKILL) to the same numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from groupmixnorm.cli import STATE_FILE, main
from groupmixnorm.data import load_dataset
from groupmixnorm.metrics import METRIC_NAMES
from groupmixnorm.methods import make_method
from groupmixnorm.methods.erm import ERM
from groupmixnorm.training import TrainConfig, TrainingDiverged, train
from groupmixnorm.training.resume import ResumeError, ResumePoint

CONFIG = TrainConfig(epochs=4, iterations=8, batch_size=64, hidden=(16,), select="ap")


@pytest.fixture(scope="module")
def adult():
    return load_dataset("adult")


class Interrupt(Exception):
    pass


def _stop_after(epoch: int):
    def on_epoch(finished: int, _: dict) -> None:
        if finished == epoch:
            raise Interrupt
    return on_epoch


def _comparable(result) -> tuple:
    history = [{k: v for k, v in row.items()} for row in result.history]
    return result.metrics, result.selected_epoch, history


@pytest.mark.parametrize("name, options", [("gmn", {}), ("adversarial", {"lam": 0.5}), ("fairmixup", {"lam": 0.5})])
def test_an_interrupted_run_resumes_to_the_same_numbers(adult, tmp_path: Path, name: str, options: dict) -> None:
    straight = train(make_method(name, **options), adult, CONFIG)
    point = ResumePoint(tmp_path / "state.pt", {"run": name}, resume=True)
    with pytest.raises(Interrupt):
        train(make_method(name, **options), adult, CONFIG, on_epoch=_stop_after(1), resume=point)
    assert point.path.exists()
    resumed_epochs: list[int] = []
    resumed = train(make_method(name, **options), adult, CONFIG, resume=point,
                    on_epoch=lambda epoch, _: resumed_epochs.append(epoch))
    assert resumed_epochs == [2, 3]  # epochs 0 and 1 were not trained again
    assert _comparable(resumed) == _comparable(straight)


def test_a_state_of_another_run_is_refused(adult, tmp_path: Path) -> None:
    point = ResumePoint(tmp_path / "state.pt", {"seed": 0}, resume=True)
    with pytest.raises(Interrupt):
        train(make_method("erm"), adult, CONFIG, on_epoch=_stop_after(0), resume=point)
    with pytest.raises(ResumeError, match="different run"):
        train(make_method("erm"), adult, CONFIG, resume=ResumePoint(point.path, {"seed": 1}, resume=True))
    point.path.write_bytes(b"not a state")
    with pytest.raises(ResumeError, match="cannot read"):
        train(make_method("erm"), adult, CONFIG, resume=point)


@dataclass
class DivergesAt(ERM):
    """ERM whose loss turns NaN at one (epoch, batch)."""

    epoch_batch: tuple[int, int] = (2, 3)

    def __post_init__(self) -> None:
        self.calls = 0

    def training_loss(self, model, batch):
        loss, logs = super().training_loss(model, batch)
        epoch, step = divmod(self.calls, CONFIG.iterations)
        self.calls += 1
        return (loss * float("nan"), logs) if (epoch, step) == self.epoch_batch else (loss, logs)


def test_a_diverged_loss_names_epoch_and_batch_and_keeps_the_last_good_state(adult, tmp_path: Path) -> None:
    point = ResumePoint(tmp_path / "state.pt", {"run": "nan"})
    with pytest.raises(TrainingDiverged, match=r"epoch 3, batch 4"):  # (2, 3) counted from 0
        train(DivergesAt(), adult, CONFIG, resume=point)
    state = torch.load(point.path, weights_only=False)
    assert state["epoch"] == 1 and len(state["history"]) == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_cli_reports_divergence_in_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setitem(sys.modules["groupmixnorm.methods"].METHODS, "erm", DivergesAt)
    code = main(["train", "--dataset", "adult", "--method", "erm", "--epochs", "4", "--iterations", "8",
                 "--batch-size", "64", "--hidden", "16", "--quiet", "--out", str(tmp_path)])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1
    assert "epoch 3, batch 4" in error[0] and STATE_FILE in error[0]
    assert (tmp_path / STATE_FILE).exists() and not (tmp_path / "metrics.json").exists()


@pytest.mark.slow
def test_train_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    args = ["train", "--dataset", "adult", "--method", "gmn", "--epochs", "6", "--iterations", "40",
            "--batch-size", "128", "--hidden", "32", "--quiet"]
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "groupmixnorm", *args, "--out", str(killed)],
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / STATE_FILE).exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if not (killed / STATE_FILE).exists():
        pytest.fail("the run ended or stalled before its first epoch's state was written")
    assert not (killed / "metrics.json").exists()
    assert main([*args, "--out", str(killed), "--resume"]) == 0
    assert not (killed / STATE_FILE).exists()  # removed once the run completed
    assert main([*args, "--out", str(tmp_path / "straight")]) == 0
    resumed, straight = (json.loads((folder / "metrics.json").read_text()) for folder in (killed, tmp_path / "straight"))
    assert {k: resumed[k] for k in METRIC_NAMES} == {k: straight[k] for k in METRIC_NAMES}
    assert [{k: v for k, v in row.items()} for row in resumed["history"]] == straight["history"]
