"""Shared test set-up."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from groupmixnorm.data import Split, TabularDataset


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


def _planted_split(rng: np.random.Generator, n: int) -> Split:
    """Two groups; group 1 has a higher mean on the label's main feature, so a plain model favours it."""
    a = rng.integers(0, 2, size=n)
    X = rng.normal(size=(n, 4))
    X[:, 0] += 1.5 * a
    logits = 2.0 * X[:, 0] + 0.5 * X[:, 1] - 1.5
    y = (rng.random(n) < 1 / (1 + np.exp(-logits))).astype(np.int64)
    return Split(X.astype(np.float32), y, a.astype(np.int64))


@pytest.fixture(scope="session")
def planted() -> TabularDataset:
    """Two groups of a planted logistic model where ERM favours group 1 (1500/500/1000 rows)."""
    rng = np.random.default_rng(0)
    train_split, val_split, test_split = (_planted_split(rng, n) for n in (1500, 500, 1000))
    return TabularDataset(
        name="planted", train=train_split, val=val_split, test=test_split,
        feature_names=[f"x{i}" for i in range(4)], sensitive="a", group_names=["g0", "g1"],
        protocol="synthetic", preprocessor=None,
    )
