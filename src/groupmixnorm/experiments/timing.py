"""Epoch time of several training settings measured side by side, so their ratios share one machine load."""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import torch

from groupmixnorm.data import TabularDataset
from groupmixnorm.methods import make_method
from groupmixnorm.methods.base import ModelSpec
from groupmixnorm.training import TrainConfig
from groupmixnorm.training.loop import to_tensors, train_one_epoch
from groupmixnorm.training.prepare import prepare


def time_epochs(
    settings: Sequence[tuple[str, str, dict[str, Any], str]],
    data: TabularDataset,
    config: TrainConfig,
    *,
    rounds: int = 7,
) -> pd.DataFrame:
    """Median seconds per training epoch of each ``(label, method, options, sampling)`` setting.

    The settings take turns, one epoch each, for ``rounds`` rounds (validation and selection are not
    timed). The first setting is the reference: the ``x_reference`` column divides by its median.
    Methods fitted outside the torch loop (``expgrad``) are not timed here.
    """
    split = to_tensors(data.train, torch.device(config.device))
    runners = [_epoch_runner(method, options, sampling, data, split, config) for _, method, options, sampling in settings]
    samples: list[list[float]] = [[] for _ in settings]
    for _ in range(rounds):
        for index, run_epoch in enumerate(runners):
            started = time.perf_counter()
            run_epoch()
            samples[index].append(time.perf_counter() - started)
    medians = [statistics.median(values) for values in samples]
    return pd.DataFrame({
        "setting": [label for label, *_ in settings],
        "seconds_per_epoch": medians,
        "x_reference": [median / medians[0] for median in medians],
    })


def _epoch_runner(
    method_name: str, options: dict[str, Any], sampling: str, data: TabularDataset, split: Any, config: TrainConfig
) -> Callable[[], Any]:
    method = make_method(method_name, **options)
    settings = dataclasses.replace(config, sampling=sampling)
    run = prepare(method, ModelSpec.of(data, settings.hidden), settings)
    return lambda: train_one_epoch(method, run.trained, run.optimizer, split, settings, run.generator, 0)
