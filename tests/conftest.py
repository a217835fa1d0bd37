"""Shared test set-up."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models on a shared 2-core machine run many times faster on one thread than on several."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def saved_run(tmp_path_factory):
    """``saved_run(method, epochs, hidden)``: train on Adult with ``--save``; the folder holds metrics.json
    and model.pt. Runs are cached per arguments for the session."""
    from groupmixnorm import cli

    runs = {}

    def run(method: str, epochs: int, hidden: int):
        key = (method, epochs, hidden)
        if key not in runs:
            folder = tmp_path_factory.mktemp(f"{method}-run")
            argv = ["train", "--dataset", "adult", "--method", method, "--epochs", str(epochs), "--hidden",
                    str(hidden), "--quiet", "--out", str(folder), "--save", str(folder / "model.pt")]
            assert cli.main(argv) == 0
            runs[key] = folder
        return runs[key]

    return run
