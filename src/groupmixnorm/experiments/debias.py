"""Debiasing a pre-trained network: fine-tune it with a fair method on a small, stratified share of the data."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
from sklearn.model_selection import train_test_split
import torch
from torch import Tensor, nn

from groupmixnorm.data import Split
from groupmixnorm.experiments.spec import run_record, setting_label
from groupmixnorm.methods import make_method
from groupmixnorm.nn import GroupMixNorm1d
from groupmixnorm.training import TrainConfig, train
from groupmixnorm.training.checkpoint import Checkpoint
from groupmixnorm.training.prepare import Start

#: Methods that can fine-tune a pre-trained MLP (their networks share its layers, gmn adds its own).
DEBIAS_METHODS = ("gmn", "gapreg")


def stratified_fraction(split: Split, fraction: float, seed: int) -> Split:
    """A seeded share ``fraction`` of ``split``, stratified by group and label (every cell keeps its share)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return split
    cells = split.a * 2 + split.y
    index = np.arange(len(split.y))
    try:
        kept, _ = train_test_split(index, train_size=fraction, stratify=cells, random_state=seed)
    except ValueError as error:  # too few rows for some cell at this fraction
        raise ValueError(f"fraction {fraction} is too small to keep every group and label: {error}") from None
    kept = np.sort(kept)
    return Split(split.X[kept], split.y[kept], split.a[kept])


def start_from_pretrained(pretrained_state: dict[str, Tensor], calibration_x: Tensor | None = None) -> Start:
    """A ``start`` for :func:`~groupmixnorm.training.train`: load a pre-trained network's weights into the
    layers a freshly built model shares with it.

    Layers only the new model has (a GroupMixNorm layer on the logit) keep their fresh initialisation, made to
    start as the identity on ``calibration_x`` when given (see :func:`_start_as_identity`); a pre-trained
    layer with no place in the new model is an error.
    """
    def start(model: nn.Module) -> None:
        state = dict(pretrained_state)
        # A layer just before a normalization layer has no bias (the normalization removes any shift): the
        # pre-trained bias moves into the normalization layer's affine shift below.
        own = model.state_dict()
        absorbed = {key: state.pop(key) for key in list(state)
                    if key.endswith(".bias") and key not in own and key.removesuffix("bias") + "weight" in own}
        result = model.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"the pre-trained network does not fit the new model: unexpected "
                             f"{', '.join(result.unexpected_keys)}")
        if calibration_x is not None and isinstance(model, nn.Sequential) and isinstance(model[-1], GroupMixNorm1d):
            _start_as_identity(model, calibration_x, shift=absorbed.get(f"{len(model) - 2}.bias"))

    return start


@torch.no_grad()
def _start_as_identity(model: nn.Sequential, x: Tensor, shift: Tensor | None = None) -> None:
    """Make a GroupMixNorm layer just added on the logit compute the identity at first.

    In training the layer standardizes the logit; its affine and running statistics start at the mean and
    deviation of the pre-trained logits on ``x``, so the fine-tuned model begins where the pre-trained one
    was, instead of re-centring its scores (which moves every decision at threshold 0.5). ``shift`` is the
    pre-trained logit layer's bias where the new model's logit layer has none: the layer adds it back.
    """
    layer = model[-1]
    logits = model[:-1](x)
    mean, std = logits.mean(dim=0), logits.std(dim=0, unbiased=False).clamp_min(1e-3)
    layer.weight.copy_(std)
    layer.bias.copy_(mean if shift is None else mean + shift)
    layer.running_mean.copy_(mean)
    layer.running_var.copy_(std**2 - layer.eps)
    layer.running_mix_mean.copy_(mean)
    layer.running_mix_std.copy_(std)


def debias(
    checkpoint: Checkpoint,
    *,
    method: str = "gmn",
    options: dict[str, Any] | None = None,
    fraction: float,
    config: TrainConfig,
    command: str = "",
) -> dict[str, Any]:
    """Fine-tune ``checkpoint``'s network with ``method`` on ``fraction`` of its training data.

    The data are reloaded exactly as the checkpoint's run loaded them (same split and preprocessing); only
    the training split is cut down (stratified by group and label, seeded with ``config.seed``); validation
    and test stay whole. Returns a record shaped like ``groupmixnorm train``'s metrics.json, with the
    fraction and the pre-trained checkpoint in its ``spec``.
    """
    if method not in DEBIAS_METHODS:
        raise ValueError(f"debias fine-tunes with method {' or '.join(DEBIAS_METHODS)}, got {method!r}")
    if checkpoint.method.name != "erm":
        raise ValueError(f"debias starts from an ERM checkpoint; this one was trained with {checkpoint.method.name!r}")
    options = dict(options or {})
    if method == "gmn":
        options = {"placement": "logit", **options}
        if options["placement"] != "logit":
            raise ValueError("debias inserts GroupMixNorm on the logit (the placement that works on Adult)")
    started = time.perf_counter()
    data = checkpoint.run_data()
    data = dataclasses.replace(data, train=stratified_fraction(data.train, fraction, config.seed))
    config = dataclasses.replace(config, hidden=tuple(checkpoint.spec["config"]["hidden"]))
    calibration = torch.as_tensor(data.train.X, dtype=torch.float32)
    fair = make_method(method, **options)
    result = train(fair, data, config, start=start_from_pretrained(checkpoint.model.state_dict(), calibration))
    spec = {"debias": {"from": checkpoint.spec, "fraction": fraction}, "method": method, "method_options": options,
            "config": dataclasses.asdict(config)}
    label = f"fraction={fraction:g}," + setting_label(options)
    return run_record(fair, data, result, spec=spec, setting=label, seed=config.seed, command=command,
                      started=started)
