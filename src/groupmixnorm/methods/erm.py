"""Empirical risk minimisation: the unconstrained baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor, nn

from groupmixnorm.methods.base import Batch, Method, ModelSpec, binary_cross_entropy, option
from groupmixnorm.methods.models import build_network


@dataclass
class ERM(Method):
    """Plain cross-entropy training of the MLP, optionally with batch normalization."""

    name = "erm"
    supports_distributed: ClassVar[bool] = True
    norm: str = option("none", "normalization layer of the ERM model", choices=("none", "batchnorm"))

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return build_network(spec, norm=self.norm)

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        loss = binary_cross_entropy(model(batch.x).squeeze(-1), batch.y)
        return loss, {"bce": loss.item()}
