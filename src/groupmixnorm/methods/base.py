"""The strategy interface that every training method implements.

The training loop (:mod:`groupmixnorm.training`) owns data, optimizer, epochs, selection and records. A
method only says which model to build, which batches it wants, what loss to minimise on a batch, and how
to score a split. Options of a method are the fields of its dataclass; the command line and the bench
build their flags and commands from those fields, so a new option needs no other change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from torch import Tensor, nn

if TYPE_CHECKING:
    from groupmixnorm.data import TabularDataset
    from groupmixnorm.training import TrainConfig

Sampling = Literal["random", "group", "group_label"]
#: Maps a feature matrix ``(n, d)`` and the rows' group ids ``(n,)`` to scores in ``[0, 1]`` of shape ``(n,)``
#: (probabilities of ``y = 1``). Only methods that need the attribute at prediction read the group ids.
Scorer = Callable[[np.ndarray, np.ndarray], np.ndarray]


@dataclass(frozen=True)
class Batch:
    """One training batch: features ``x``, binary labels ``y`` (float 0/1) and group ids ``a``."""

    x: Tensor
    y: Tensor
    a: Tensor


@dataclass(frozen=True)
class ModelSpec:
    """What a method needs to know to build its model.

    ``input_shape`` is the shape of one input without the batch dimension: ``(C, H, W)`` for images, for
    which ``hidden`` lists the channels of the convolution blocks; ``None`` means a feature vector of
    ``in_features``, for which ``hidden`` lists the MLP's widths.
    """

    in_features: int
    num_groups: int
    hidden: tuple[int, ...] = (200, 200)
    input_shape: tuple[int, ...] | None = None

    @classmethod
    def of(cls, data: TabularDataset, hidden: tuple[int, ...]) -> ModelSpec:
        """The spec of a model for ``data``'s inputs and groups."""
        shape = tuple(data.input_shape) if len(data.input_shape) > 1 else None
        return cls(data.num_features, data.num_groups, tuple(hidden), shape)

    @property
    def is_image(self) -> bool:
        return self.input_shape is not None and len(self.input_shape) == 3


#: The criteria a method's ``fairness`` option may name: demographic parity or equalized odds.
FAIRNESS_CHOICES = ("dp", "eo")


def option(default: Any, help: str, choices: tuple | None = None) -> Any:
    """A method option: a dataclass field that also carries its command-line help, and the values it may
    take (``choices``), which :class:`Method` checks on construction."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class Method:
    """Base class of training methods. Subclasses set ``name`` and override what they change."""

    name: ClassVar[str] = ""
    #: Whether the method fits without the torch loop (:meth:`fit_outside_loop`); its models are not saved.
    fitted_outside_loop: ClassVar[bool] = False
    #: Whether multi-process training (``torchrun``) may train it: its whole training state is the model, so
    #: that DDP keeps the processes' copies identical (an adversary would be trained on one slice alone).
    supports_distributed: ClassVar[bool] = False

    def __post_init__(self) -> None:
        """Refuse an option value outside the option's ``choices``; subclasses that check more call this first."""
        for item in method_fields(type(self)):
            choices = item.metadata.get("choices")
            value = getattr(self, item.name)
            if choices is not None and value not in choices:
                raise ValueError(f"method {self.name!r}: option {item.name} must be one of "
                                 f"{', '.join(map(str, choices))}, got {value!r}")

    def batch_sampling(self) -> Sampling:
        """How the loop draws training batches (``TrainConfig(sampling="auto")``): at random (the default),
        balanced per group, or per group and label."""
        return "random"

    def build_model(self, spec: ModelSpec) -> nn.Module:
        raise NotImplementedError

    def setup(self, model: nn.Module, seed: int, spec: ModelSpec) -> None:
        """Called once after ``model`` is built from ``spec`` (for example to create an adversary)."""

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """The loss to minimise on ``batch`` and any numbers worth logging."""
        raise NotImplementedError

    def after_step(self, model: nn.Module, batch: Batch) -> None:
        """Called after each optimizer step of the model (for example to update an adversary)."""

    def predict_logits(self, model: nn.Module, x: Tensor, a: Tensor | None = None) -> Tensor:
        """Logits for ``x`` with the model in evaluation mode; ``a`` is offered, most methods ignore it."""
        return model(x).squeeze(-1)

    def state_dict(self) -> dict[str, Any]:
        """Training state the method keeps outside the model (an adversary and its optimizer, say), so
        that an interrupted run can resume; empty for most methods."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (after :meth:`setup`)."""

    def options(self) -> dict[str, Any]:
        """The method's options as a plain dict (the dataclass fields)."""
        return dataclasses.asdict(self)

    def fit_outside_loop(self, data: TabularDataset, config: TrainConfig) -> Scorer | None:
        """Fit without the torch loop and return the fitted scorer, or ``None`` to use the loop (the default).

        Methods that are not trained with torch alone (outside peers such as fairlearn's reductions and
        post-processing) override this and set :attr:`fitted_outside_loop`: they fit on ``data.train`` (seeded
        by ``config.seed``) and return a function that scores feature matrices and group ids; the loop then
        only evaluates that scorer on the validation and test splits.
        """
        return None

    def uses_sensitive_at_prediction(self) -> bool:
        """Whether predictions need the protected attribute (a deployed model should not)."""
        return False


def binary_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.binary_cross_entropy_with_logits(logits, y)


def method_fields(cls: type[Method]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]
