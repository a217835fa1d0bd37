"""Gap regularization: cross-entropy plus a weighted, differentiable fairness gap on the batch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from groupmixnorm.methods.base import FAIRNESS_CHOICES, Batch, Method, ModelSpec, Sampling, binary_cross_entropy, option
from groupmixnorm.methods.models import build_network


def group_mean_gap(scores: Tensor, groups: Tensor) -> Tensor:
    """Largest difference between the groups' mean scores in the batch (groups present only)."""
    if groups.numel() == 0:
        return scores.new_zeros(())
    num_groups = int(groups.max()) + 1  # groups absent from the batch take no share
    counts = torch.zeros(num_groups, device=scores.device).index_add(0, groups, torch.ones_like(scores))
    sums = torch.zeros(num_groups, device=scores.device).index_add(0, groups, scores)
    present = counts > 0
    means = sums[present] / counts[present]
    if means.numel() < 2:
        return scores.new_zeros(())
    return means.max() - means.min()


def batch_gap(scores: Tensor, batch: Batch, fairness: str) -> Tensor:
    """The soft demographic-parity gap, or for ``"eo"`` the sum over labels of the per-label gaps."""
    if fairness == "dp":
        return group_mean_gap(scores, batch.a)
    gaps = [group_mean_gap(scores[batch.y == label], batch.a[batch.y == label]) for label in (0, 1)]
    return gaps[0] + gaps[1]


@dataclass
class GapRegularization(Method):
    """Cross-entropy plus ``lam`` times the batch's soft DP gap (or equalized-odds gap), as in the
    "GapReg" baseline of Fair Mixup (Chuang & Mroueh, ICLR 2021); batches are balanced per group
    (per group and label for ``"eo"``) so every batch estimates the gap."""

    name = "gapreg"
    supports_distributed: ClassVar[bool] = True
    lam: float = option(0.5, "weight of the fairness gap in the loss")
    fairness: str = option("dp", "gap to regularize: dp (demographic parity) or eo (equalized odds)",
                           choices=FAIRNESS_CHOICES)

    def batch_sampling(self) -> Sampling:
        """Balanced per group (per group and label for ``"eo"``), so that every batch estimates the gap."""
        return "group" if self.fairness == "dp" else "group_label"

    def build_model(self, spec: ModelSpec) -> nn.Module:
        return build_network(spec)

    def training_loss(self, model: nn.Module, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        logits = model(batch.x).squeeze(-1)
        bce = binary_cross_entropy(logits, batch.y)
        gap = batch_gap(torch.sigmoid(logits), batch, self.fairness)
        return bce + self.lam * gap, {"bce": bce.item(), "gap": gap.item()}
