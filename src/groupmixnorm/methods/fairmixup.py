"""Fair Mixup (Chuang & Mroueh, ICLR 2021): regularize the path between groups in input space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from groupmixnorm.methods.base import FAIRNESS_CHOICES, Batch, Method, ModelSpec, Sampling, binary_cross_entropy, option
from groupmixnorm.methods.models import build_network


@dataclass
class FairMixup(Method):
    """Cross-entropy plus ``lam`` times the smoothness of the mean prediction along a mixup path.

    Samples of two groups are paired, mixed as ``x_t = t * x_a + (1 - t) * x_b`` with ``t ~ U(0, 1)``, and
    the regularizer is ``|E[d/dt f(x_t)]|``, the derivative of the mean score along the path, computed from
    input gradients (``"dp"``). For equalized odds (``"eo"``) the pairs are formed within each label and the
    two terms are added. With more than two groups, each batch regularizes one random pair of groups.
    Inputs may be feature rows or images; images are mixed pixel by pixel.
    """

    name = "fairmixup"
    supports_distributed: ClassVar[bool] = True
    lam: float = option(0.5, "weight of the path regularizer")
    fairness: str = option("dp", "dp (pairs across groups) or eo (pairs across groups within each label)",
                           choices=FAIRNESS_CHOICES)

    def batch_sampling(self) -> Sampling:
        """Balanced per group (per group and label for ``"eo"``), so that every batch pairs groups."""
        return "group" if self.fairness == "dp" else "group_label"

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return build_network(spec)

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        bce = binary_cross_entropy(model(batch.x).squeeze(-1), batch.y)
        labels = (None,) if self.fairness == "dp" else (0, 1)
        path = sum(self._path_derivative(model, batch, label) for label in labels)
        return bce + self.lam * path, {"bce": bce.item(), "path": path.item()}

    def _path_derivative(self, model: nn.Module, batch: Batch, label: int | None) -> Tensor:
        mask = torch.ones_like(batch.y, dtype=torch.bool) if label is None else batch.y == label
        x, a = batch.x[mask], batch.a[mask]
        present = torch.unique(a)
        if len(present) < 2:
            return batch.x.new_zeros(())
        pair = present[torch.randperm(len(present), device=a.device)[:2]]
        first, second = x[a == pair[0]], x[a == pair[1]]
        count = min(len(first), len(second))
        first, second = first[:count], second[:count]
        t = torch.rand((), device=x.device)
        mixed = (t * first + (1 - t) * second).requires_grad_(True)
        mean_score = torch.sigmoid(model(mixed).squeeze(-1)).mean()
        (gradient,) = torch.autograd.grad(mean_score, mixed, create_graph=True)
        return (gradient * (first - second)).flatten(1).sum(dim=1).sum().abs()  # any input shape: rows or images
