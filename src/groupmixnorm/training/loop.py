"""The one training loop shared by every method."""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from groupmixnorm.data import Split, TabularDataset
from groupmixnorm.data.tabular import check_splits
from groupmixnorm.methods.base import Batch, Method, ModelSpec, Scorer
from groupmixnorm.metrics import fairness_report, group_rates
from groupmixnorm.nn.modules import NonFiniteStatistics
from groupmixnorm.training.distributed import Workers, workers_from_environment
from groupmixnorm.training.prepare import Start, prepare
from groupmixnorm.training.resume import LoopState, ResumePoint, load_state, save_state
from groupmixnorm.training.sampling import batch_indices

SELECTION_RULES = ("ap", "last", "dp_gap", "eodds_gap")
SAMPLING_CHOICES = ("auto", "random", "group", "group_label")
#: The validation gaps that ``gap_target`` and the gap rules of ``select`` read.
GAP_METRIC_CHOICES = ("dp_gap", "eopp_gap", "eodds_gap")


class TrainingDiverged(RuntimeError):
    """The loss, or a normalization layer's batch statistics, became NaN or infinite; the message names the
    epoch and batch, both counted from 1."""


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the loop itself (a method's own options live on the method).

    ``select`` picks the epoch whose weights are kept, from validation metrics: ``"ap"`` the best average
    precision (among epochs whose validation ``gap_metric`` is at most ``gap_target``, if a target is
    given; the smallest gap if none meets it), ``"last"`` the final epoch, ``"dp_gap"`` / ``"eodds_gap"``
    the smallest validation gap (Fair Mixup's rule, which ignores accuracy).

    ``sampling`` is how batches are drawn: ``"auto"`` lets the method choose (its
    :meth:`~groupmixnorm.methods.Method.batch_sampling`: random for ERM and GroupMixNorm, group-balanced for gap
    regularizers); ``"group"`` / ``"group_label"`` force balanced batches
    of ``batch_size`` per group (per group and label) for every method, as the Fair Mixup protocol does.
    """

    epochs: int = 10
    batch_size: int = 256
    iterations: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.0
    hidden: tuple[int, ...] = (200, 200)
    seed: int = 0
    select: str = "ap"
    gap_metric: str = "dp_gap"
    gap_target: float | None = None
    sampling: str = "auto"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2, got {self.batch_size}")
        if self.iterations is not None and self.iterations < 1:
            raise ValueError(f"iterations must be at least 1 (or None for full passes), got {self.iterations}")
        if self.select not in SELECTION_RULES:
            raise ValueError(f"select must be one of {SELECTION_RULES}, got {self.select!r}")
        if self.sampling not in SAMPLING_CHOICES:
            raise ValueError(f"sampling must be one of {SAMPLING_CHOICES}, got {self.sampling!r}")
        if self.gap_metric not in GAP_METRIC_CHOICES:
            raise ValueError(f"gap_metric must be dp_gap, eopp_gap or eodds_gap, got {self.gap_metric!r}")


@dataclass
class TrainResult:
    """What a run produced: test metrics of the selected epoch, the history, timings and the model.

    ``model`` is ``None`` for methods fitted outside the torch loop (:meth:`Method.fit_outside_loop`); their
    fit counts as one epoch.
    """

    metrics: dict[str, float]
    val_metrics: dict[str, float]
    selected_epoch: int
    history: list[dict[str, float]]
    epoch_seconds: list[float]
    group_rates: pd.DataFrame
    model: nn.Module | None
    test_scores: np.ndarray = field(repr=False)

    @property
    def median_epoch_seconds(self) -> float:
        return statistics.median(self.epoch_seconds)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, numpy and torch; return a torch generator for batch order."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def train(
    method: Method,
    data: TabularDataset,
    config: TrainConfig = TrainConfig(),
    *,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    resume: ResumePoint | None = None,
    start: Start | None = None,
) -> TrainResult:
    """Train ``method`` on ``data`` and evaluate the selected epoch on the test split.

    ``start`` sets the new model's starting weights (see :func:`~groupmixnorm.training.prepare.prepare`);
    by default they are drawn afresh from ``config.seed``.

    With ``resume``, the loop's whole state is saved to ``resume.path`` after every epoch and, when
    ``resume.resume`` is set and a state exists, restored from there first, so the run continues exactly
    where it stopped (:mod:`groupmixnorm.training.resume`). A NaN or infinite loss raises
    :class:`TrainingDiverged` naming the epoch and batch; the saved state is then the last good epoch's.
    Data that cannot be trained on or measured (see :func:`~groupmixnorm.data.tabular.check_splits`) is
    refused before anything trains.
    """
    check_splits(data)
    seed_everything(config.seed)
    outside = _fit_outside_loop(method, data, config, on_epoch)
    if outside is not None:
        return outside
    device = torch.device(config.device)
    workers = workers_from_environment(device)
    train_split, val_split, test_split = (to_tensors(s, device) for s in (data.train, data.val, data.test))
    prepared = prepare(method, ModelSpec.of(data, config.hidden), config, workers, start)
    model, trained, optimizer, generator = prepared.model, prepared.trained, prepared.optimizer, prepared.generator

    loop = LoopState(epoch=-1, history=[], epoch_seconds=[], best=None)
    if resume is not None:
        loop = load_state(resume, model=model, optimizer=optimizer, method=method, generator=generator) or loop
    for epoch in range(loop.epoch + 1, config.epochs):
        started = time.perf_counter()
        train_log = train_one_epoch(method, trained, optimizer, train_split, config, generator, epoch, workers)
        loop.epoch_seconds.append(time.perf_counter() - started)
        val_metrics, _ = evaluate(method, model, val_split)
        loop.history.append({"epoch": epoch, **train_log, **{f"val_{k}": v for k, v in val_metrics.items()}})
        if _is_better(config, val_metrics, loop.history, loop.best):
            loop.best = (epoch, copy.deepcopy(model.state_dict()))
        loop.epoch = epoch
        if resume is not None and workers.is_main:
            save_state(resume, loop, model=model, optimizer=optimizer, method=method, generator=generator)
        if on_epoch is not None:
            on_epoch(epoch, val_metrics)

    assert loop.best is not None
    selected_epoch, state = loop.best
    history, epoch_seconds = loop.history, loop.epoch_seconds
    model.load_state_dict(state)
    test_metrics, test_scores = evaluate(method, model, test_split)
    val_metrics, _ = evaluate(method, model, val_split)
    rates = named_group_rates(data, test_split.y.cpu().numpy(), test_scores, test_split.a.cpu().numpy())
    return TrainResult(test_metrics, val_metrics, selected_epoch, history, epoch_seconds, rates, model, test_scores)


def named_group_rates(data: TabularDataset, y: np.ndarray, scores: np.ndarray, a: np.ndarray) -> pd.DataFrame:
    """:func:`group_rates` of one split with the index relabelled by the dataset's group names."""
    rates = group_rates(y, scores, a)
    rates.index = [data.group_names[int(i)] for i in rates.index]
    rates.index.name = "group"
    return rates


def _fit_outside_loop(
    method: Method,
    data: TabularDataset,
    config: TrainConfig,
    on_epoch: Callable[[int, dict[str, float]], None] | None,
) -> TrainResult | None:
    """Fit a method that does not use the torch loop (``None`` for those that do): the fit is epoch 0."""
    started = time.perf_counter()
    scorer = method.fit_outside_loop(data, config)
    if scorer is None:
        return None
    seconds = time.perf_counter() - started
    val_metrics, _ = _score_split(scorer, data.val)
    if on_epoch is not None:
        on_epoch(0, val_metrics)
    test_metrics, test_scores = _score_split(scorer, data.test)
    rates = named_group_rates(data, data.test.y, test_scores, data.test.a)
    history = [{"epoch": 0, **{f"val_{k}": v for k, v in val_metrics.items()}}]
    return TrainResult(test_metrics, val_metrics, 0, history, [seconds], rates, None, test_scores)


def _score_split(scorer: Scorer, split: Split) -> tuple[dict[str, float], np.ndarray]:
    scores = np.asarray(scorer(split.X, split.a), dtype=np.float64)
    return fairness_report(split.y, scores, split.a), scores


#: Images are scored in chunks of this many, so that a CNN's activations on a whole split never sit in memory.
EVAL_IMAGE_CHUNK = 1024


def evaluate(method: Method, model: nn.Module, split: Batch) -> tuple[dict[str, float], np.ndarray]:
    """Scores (probabilities) and :func:`fairness_report` of ``model`` on one split."""
    model.eval()
    # Feature rows are scored in one call (as before, so tabular numbers stay bit for bit the same).
    chunk = EVAL_IMAGE_CHUNK if split.x.dim() > 2 else max(len(split.y), 1)
    with torch.no_grad():
        logits = [method.predict_logits(model, x, a) for x, a in zip(split.x.split(chunk), split.a.split(chunk))]
        scores = torch.sigmoid(torch.cat(logits)).cpu().numpy().astype(np.float64)
    metrics = fairness_report(split.y.cpu().numpy(), scores, split.a.cpu().numpy())
    return metrics, scores


def train_one_epoch(
    method: Method,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    split: Batch,
    config: TrainConfig,
    generator: torch.Generator,
    epoch: int,
    workers: Workers = Workers(),
) -> dict[str, float]:
    """One epoch of optimizer steps on ``split`` (see :func:`to_tensors`); returns the mean of each logged
    number. :func:`train` calls it; :mod:`groupmixnorm.experiments.timing` times it alone. Under several
    ``workers`` each process steps on its slice of every batch."""
    model.train()
    totals: dict[str, float] = {}
    steps = 0
    sampling = method.batch_sampling() if config.sampling == "auto" else config.sampling
    indices = batch_indices(
        sampling, split.y, split.a, batch_size=config.batch_size, iterations=config.iterations,
        generator=generator,
    )
    for step, index in enumerate(indices):
        if len(index) < 2 * workers.world_size:
            continue  # a trailing batch too small for batch statistics (on every process: all skip alike)
        batch_size = len(index)
        index = workers.shard(index)
        batch = Batch(split.x[index], split.y[index], split.a[index])
        try:
            loss, logs = method.training_loss(model, batch)
        except NonFiniteStatistics as error:
            if epoch == 0 and steps == 0:
                raise  # no step taken yet: the model is as initialized, so the batch itself is at fault
            # train() checked the data: after a step, non-finite statistics come from the weights.
            raise _diverged(epoch, step, method, "a normalization layer's batch statistics became NaN or "
                            "infinite") from error
        if not torch.isfinite(loss):
            raise _diverged(epoch, step, method, f"the loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        method.after_step(model, batch)
        for key, value in logs.items():
            # This process's share of the whole batch's mean; the shares are summed over processes below.
            totals[key] = totals.get(key, 0.0) + value * len(index) / batch_size
        steps += 1
    totals = workers.sum_over_processes(totals, split.x.device)
    return {f"train_{key}": value / max(steps, 1) for key, value in totals.items()}


def _diverged(epoch: int, step: int, method: Method, what: str) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged at epoch {epoch + 1}, batch {step + 1} (method {method.name}): {what}")


def _is_better(
    config: TrainConfig, val: dict[str, float], history: list[dict[str, float]], best: tuple[int, Any] | None
) -> bool:
    if best is None or config.select == "last":
        return True
    previous = history[best[0]]
    if config.select in ("dp_gap", "eodds_gap"):
        return val[config.select] < previous[f"val_{config.select}"]
    if config.gap_target is None:
        return val["ap"] > previous["val_ap"]
    gap, previous_gap = val[config.gap_metric], previous[f"val_{config.gap_metric}"]
    meets, previous_meets = gap <= config.gap_target, previous_gap <= config.gap_target
    if meets != previous_meets:
        return meets
    return val["ap"] > previous["val_ap"] if meets else gap < previous_gap


def to_tensors(split: Split, device: torch.device) -> Batch:
    """A numpy split as tensors on ``device``: float features, float 0/1 labels, long group ids."""
    return Batch(
        torch.as_tensor(split.X, dtype=torch.float32, device=device),
        torch.as_tensor(split.y, dtype=torch.float32, device=device),
        torch.as_tensor(split.a, dtype=torch.long, device=device),
    )
