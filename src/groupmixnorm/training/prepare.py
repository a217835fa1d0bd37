"""What every torch-trained run builds before its first step: the model, the method's own state, the optimizer
and the batch-order generator, from the method, the model's spec and the loop's settings.

The training loop (:func:`groupmixnorm.training.train`), the epoch-time benchmark
(:mod:`groupmixnorm.experiments.timing`) and the scikit-learn estimator all start from :func:`prepare`, so
that a model trained, timed or fitted from the same settings starts from the same weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from groupmixnorm.methods.base import Method, ModelSpec
from groupmixnorm.training.distributed import Workers, check_method, wrap_model

if TYPE_CHECKING:
    from groupmixnorm.training.loop import TrainConfig


@dataclass
class Prepared:
    """A run ready for its first epoch.

    ``model`` is the plain model (evaluated, saved and selected); ``trained`` is what the optimizer steps:
    ``model`` itself, or its synchronized DDP copy under several workers. ``generator`` draws the batch order.
    """

    model: nn.Module
    trained: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


#: Sets a freshly built model's starting weights in place (e.g. from a pre-trained network).
Start = Callable[[nn.Module], None]


def prepare(method: Method, spec: ModelSpec, config: TrainConfig, workers: Workers = Workers(),
            start: Start | None = None) -> Prepared:
    """Build ``method``'s model for ``spec`` on ``config.device`` (weights drawn from torch's global generator,
    seeded here with ``config.seed``, then set by ``start`` when given), call :meth:`Method.setup`, wrap the
    model for ``workers`` and create its Adam optimizer (``config.lr``, ``config.weight_decay``) and a
    batch-order generator seeded with ``config.seed``. A method that multi-process training does not support
    is refused under several workers.
    """
    check_method(method, workers)
    torch.manual_seed(config.seed)
    model = method.build_model(spec)
    if start is not None:
        start(model)
    model = model.to(torch.device(config.device))
    method.setup(model, config.seed, spec)
    trained = wrap_model(model, workers)
    optimizer = torch.optim.Adam(trained.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    return Prepared(model, trained, optimizer, torch.Generator().manual_seed(config.seed))
